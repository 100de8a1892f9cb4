//! Functions scripts can call: hashing, PII masking, time, JSON, UUIDs.

use rhai::{Dynamic, Engine, ImmutableString, INT};
use sha2::Digest;

use crate::handle::{to_dynamic, to_value};

/// SHA-256 as lower-case hex: pseudonymise an identifier (`hash(event.data.userId)`).
fn sha256(text: &str) -> String {
    let digest = sha2::Sha256::digest(text.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// xxHash3 64-bit as hex: fast, not cryptographic (bucketing, sampling).
fn xxhash(text: &str) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()))
}

/// `anna.smith@example.com` → `a***@example.com`.
pub fn mask_email(email: &str) -> String {
    match email.split_once('@') {
        Some((user, domain)) if !user.is_empty() => {
            let first: String = user.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        _ => "***".into(),
    }
}

/// `+33 6 12 34 56 78` → `******5678`: only the last four digits stay.
pub fn mask_phone(phone: &str) -> String {
    let digits: Vec<char> = phone.chars().filter(char::is_ascii_digit).collect();
    if digits.len() <= 4 {
        return "*".repeat(digits.len());
    }
    let last: String = digits[digits.len() - 4..].iter().collect();
    format!("{}{last}", "*".repeat(digits.len() - 4))
}

/// `Anna Maria Schmidt` → `Anna M.`: first name and the initial of the second word.
pub fn short_name(name: &str) -> String {
    let mut words = name.split_whitespace();
    match (words.next(), words.next()) {
        (Some(first), Some(second)) => {
            let initial: String = second.chars().take(1).collect();
            format!("{first} {initial}.")
        }
        (Some(first), None) => first.to_string(),
        _ => String::new(),
    }
}

fn now_millis() -> INT {
    chrono::Utc::now().timestamp_millis()
}

/// RFC 3339 text → epoch milliseconds, or `()` when it is not a time.
fn parse_time(text: &str) -> Dynamic {
    chrono::DateTime::parse_from_rfc3339(text).map(|t| Dynamic::from_int(t.timestamp_millis())).unwrap_or(Dynamic::UNIT)
}

fn format_time(millis: INT) -> String {
    chrono::DateTime::from_timestamp_millis(millis)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

fn format_time_with(millis: INT, format: &str) -> Result<String, Box<rhai::EvalAltResult>> {
    use std::fmt::Write;
    let time = chrono::DateTime::from_timestamp_millis(millis).ok_or("time out of range")?;
    let mut out = String::new();
    write!(out, "{}", time.format(format)).map_err(|_| format!("invalid time format `{format}`"))?;
    Ok(out)
}

fn to_json(value: Dynamic) -> String {
    to_value(&value).to_string()
}

fn from_json(text: &str) -> Result<Dynamic, Box<rhai::EvalAltResult>> {
    let value: conflux_api::Value = conflux_api::sonic_rs::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    Ok(to_dynamic(&value))
}

/// Registers every helper on a script engine.
pub fn register(engine: &mut Engine) {
    engine
        .register_fn("sha256", |s: ImmutableString| sha256(&s))
        .register_fn("hash", |s: ImmutableString| sha256(&s))
        .register_fn("hash", |v: Dynamic| sha256(&v.to_string()))
        .register_fn("xxhash", |s: ImmutableString| xxhash(&s))
        .register_fn("mask_email", |s: ImmutableString| mask_email(&s))
        .register_fn("mask_phone", |s: ImmutableString| mask_phone(&s))
        .register_fn("short_name", |s: ImmutableString| short_name(&s))
        .register_fn("now", now_millis)
        .register_fn("parse_time", |s: ImmutableString| parse_time(&s))
        .register_fn("format_time", format_time)
        .register_fn("format_time", |t: INT, f: ImmutableString| format_time_with(t, &f))
        .register_fn("to_json", to_json)
        .register_fn("from_json", |s: ImmutableString| from_json(&s))
        .register_fn("uuid", || uuid::Uuid::new_v4().to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privacy_helpers() {
        assert_eq!(mask_email("anna.smith@example.com"), "a***@example.com");
        assert_eq!(mask_email("nonsense"), "***");
        assert_eq!(mask_phone("+33 6 12 34 56 78"), "*******5678");
        assert_eq!(mask_phone("12"), "**");
        assert_eq!(short_name("Anna Maria Schmidt"), "Anna M.");
        assert_eq!(short_name("Cher"), "Cher");
        assert_eq!(sha256("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(xxhash("abc").len(), 16);
    }

    #[test]
    fn time_round_trip() {
        let t = parse_time("2026-11-22T10:00:00Z").as_int().unwrap();
        assert_eq!(format_time(t), "2026-11-22T10:00:00.000Z");
        assert!(parse_time("soon").is_unit());
        assert_eq!(format_time_with(t, "%Y-%m-%d %H:%M").unwrap(), "2026-11-22 10:00");
    }
}
