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
    let value = conflux_json::guard::parse(text.as_bytes()).map_err(|e| format!("invalid JSON: {e}"))?;
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
    }

    #[test]
    fn xxhash_matches_the_reference_implementation() {
        // Expected values from the reference C implementation through
        // python-xxhash 4.1.0: `xxhash.xxh3_64_hexdigest(b"abc")` etc.
        assert_eq!(xxhash("abc"), "78af5f94892f3950");
        assert_eq!(xxhash(""), "2d06800538d394c2");
        assert_eq!(xxhash("u-1"), "ea72db3c499847f0");
    }

    /// An engine with only the helpers, as scripts see them.
    fn engine() -> Engine {
        let mut engine = Engine::new();
        register(&mut engine);
        engine
    }

    #[test]
    fn now_reads_the_system_clock() {
        let before = chrono::Utc::now().timestamp_millis();
        let now: INT = engine().eval("now()").unwrap();
        let after = chrono::Utc::now().timestamp_millis();
        assert!(before <= now && now <= after, "{before} <= {now} <= {after}");
    }

    #[test]
    fn uuid_is_a_fresh_v4() {
        let engine = engine();
        let ids: Vec<String> = (0..100).map(|_| engine.eval::<String>("uuid()").unwrap()).collect();
        for id in &ids {
            // 8-4-4-4-12 lower-case hex, version nibble 4, variant 10xx (8, 9, a or b).
            let groups: Vec<&str> = id.split('-').collect();
            let lengths: Vec<usize> = groups.iter().map(|g| g.len()).collect();
            assert_eq!(lengths, vec![8, 4, 4, 4, 12], "{id}");
            assert!(id.chars().all(|c| c == '-' || c.is_ascii_digit() || ('a'..='f').contains(&c)), "{id}");
            assert!(groups[2].starts_with('4'), "version 4: {id}");
            assert!(groups[3].starts_with(['8', '9', 'a', 'b']), "RFC 4122 variant: {id}");
        }
        let mut distinct = ids.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), ids.len(), "100 calls, 100 different ids");
    }

    #[test]
    fn json_round_trips_nested_maps_and_arrays() {
        let engine = engine();
        let text: String = engine
            .eval(r#"to_json(#{ name: "Anna", tags: ["a", 1, 2.5, true, ()], stay: #{ nights: 3, rooms: [#{ n: 1 }, #{ n: 2 }] } })"#)
            .unwrap();
        let expected = serde_json::json!({
            "name": "Anna",
            "tags": ["a", 1, 2.5, true, null],
            "stay": { "nights": 3, "rooms": [{ "n": 1 }, { "n": 2 }] }
        });
        assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), expected, "{text}");

        // Back into script values: fields, array items and types survive.
        let read: String = engine
            .eval(
                r#"let v = from_json(to_json(#{ stay: #{ rooms: [#{ n: 1 }, #{ n: 2 }] }, f: 2.5, ok: true, none: () }));
                   `${v.stay.rooms[1].n}|${type_of(v.stay.rooms)}|${type_of(v.f)}|${v.ok}|${type_of(v.none)}`"#,
            )
            .unwrap();
        assert_eq!(read, "2|array|f64|true|()");
        let back = to_value(&engine.eval::<Dynamic>(&format!("from_json({:?})", expected.to_string())).unwrap());
        assert_eq!(serde_json::from_str::<serde_json::Value>(&back.to_string()).unwrap(), expected);
    }

    #[test]
    fn from_json_of_invalid_text_is_an_error() {
        let engine = engine();
        for text in ["`{\"a\": 1`", "`nope`", "`[1, 2,]`", "``"] {
            let error = engine.eval::<Dynamic>(&format!("from_json({text})")).unwrap_err().to_string();
            assert!(error.contains("invalid JSON"), "{text}: {error}");
        }
        // A script can catch it and go on.
        let caught: String =
            engine.eval(r#"let r = "none"; try { from_json("{"); } catch (e) { r = `caught: ${e}`; } r"#).unwrap();
        assert!(caught.starts_with("caught: invalid JSON"), "{caught}");
    }

    #[test]
    fn time_round_trip() {
        let t = parse_time("2026-11-22T10:00:00Z").as_int().unwrap();
        assert_eq!(format_time(t), "2026-11-22T10:00:00.000Z");
        assert!(parse_time("soon").is_unit());
        assert_eq!(format_time_with(t, "%Y-%m-%d %H:%M").unwrap(), "2026-11-22 10:00");
    }
}
