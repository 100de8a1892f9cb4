//! Secrets the process must never log: the values of secret-looking
//! options and the passwords in URLs, registered when a pipeline is loaded
//! and masked in every log line, ours and third-party libraries' alike.
//!
//! Why at the writer: a client library (async-nats at debug) logged a
//! `nats://user:password@…` URL and its connect options verbatim; masking
//! the formatted line is the one place every message passes.

use std::borrow::Cow;
use std::sync::RwLock;

/// Shorter values are not masked: they would mask ordinary words.
const MIN_SECRET_LEN: usize = 4;

/// Option names whose string values are secrets (matched on the last
/// segment of the option's path, case-insensitively).
const SECRET_NAMES: &[&str] =
    &["password", "passwd", "pass", "secret", "token", "api_key", "api_keys", "keys", "credentials"];

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Masks `secret` in every later log line.
pub fn register(secret: &str) {
    if secret.len() < MIN_SECRET_LEN {
        return;
    }
    let mut secrets = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    if !secrets.iter().any(|s| s == secret) {
        secrets.push(secret.to_string());
        // Longest first, so a secret containing another is masked whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }
}

/// Registers the secrets found in a component's options: string values of
/// secret-named options (and every string under them), and URL passwords anywhere.
pub fn register_options(options: &serde_json::Value) {
    walk(options, false);
}

fn walk(value: &serde_json::Value, secret: bool) {
    match value {
        serde_json::Value::String(text) => {
            if secret {
                register(text);
            }
            if let Some(password) = url_password(text) {
                register(password);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, secret)),
        serde_json::Value::Object(members) => {
            for (name, v) in members {
                let name = name.to_ascii_lowercase();
                let named = SECRET_NAMES.iter().any(|s| name == *s || name.ends_with(&format!("_{s}")));
                walk(v, secret || named);
            }
        }
        _ => {}
    }
}

/// The password of a `scheme://user:password@host` URL.
fn url_password(text: &str) -> Option<&str> {
    let rest = &text[text.find("://")? + 3..];
    let userinfo = &rest[..rest.find('@')?];
    if userinfo.contains('/') {
        return None;
    }
    let (_, password) = userinfo.split_once(':')?;
    Some(password)
}

/// `line` with every registered secret, and every URL password, replaced by `***`.
pub fn redact(line: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(line);
    let secrets = SECRETS.read().unwrap_or_else(|e| e.into_inner());
    for secret in secrets.iter() {
        if out.contains(secret.as_str()) {
            out = Cow::Owned(out.replace(secret.as_str(), "***"));
        }
    }
    drop(secrets);
    mask_url_passwords(out)
}

/// Masks `user:password@` after any `://`, even for URLs never registered
/// (`redis://app:***@cache:6379`).
pub fn mask_url_passwords(text: Cow<'_, str>) -> Cow<'_, str> {
    if !text.contains("://") {
        return text;
    }
    let mut out = String::with_capacity(text.len());
    let mut rest: &str = &text;
    let mut changed = false;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let end =
            tail.find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '/' | '>' | ',')).unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@').and_then(|a| authority[..a].find(':').map(|c| (c, a))) {
            Some((colon, at_sign)) if colon + 1 < at_sign => {
                out.push_str(&authority[..=colon]);
                out.push_str("***");
                out.push_str(&authority[at_sign..]);
                changed = true;
            }
            _ => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    if changed {
        Cow::Owned(out)
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_masked_registered_or_not() {
        assert_eq!(
            redact("connecting to nats://app:s3cr3t-pw@127.0.0.1:4222 now"),
            "connecting to nats://app:***@127.0.0.1:4222 now"
        );
        assert_eq!(redact(r#"url="redis://:pw12@cache:6379/0""#), r#"url="redis://:***@cache:6379/0""#);
        assert_eq!(redact("http://example.com/a:b@c"), "http://example.com/a:b@c", "a path is no userinfo");
        assert_eq!(redact("plain text"), "plain text");
    }

    #[test]
    fn secret_options_are_masked_anywhere_in_a_line() {
        register_options(&serde_json::json!({
            "url": "nats://u:urlpass-123@h:4222",
            "auth": { "token": "tok-abcdef", "api_keys": { "keys": ["key-one-1", "key-two-2"] } },
            "jwt": { "hs256_secret": "hs-secret-x" },
            "subject": "orders",
        }));
        let line =
            r#"ConnectInfo { pass: Some("urlpass-123"), auth_token: Some("tok-abcdef") } key-two-2 hs-secret-x orders"#;
        assert_eq!(redact(line), r#"ConnectInfo { pass: Some("***"), auth_token: Some("***") } *** *** orders"#);
    }
}
