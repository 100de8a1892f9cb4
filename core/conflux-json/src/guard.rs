//! What every JSON text must pass before a parser builds a tree of it:
//! bounded nesting and numbers that survive exactly.
//!
//! Why: sonic-rs (like any recursive parser, and `Value`'s drop) uses one
//! stack frame per level, so `[` × 10,000 in a 20 KB body overflowed a
//! worker's stack and aborted the process. And a number a double cannot
//! hold (`18446744073709551616`, a 100-digit integer, `1e-400`) used to come
//! out rounded; refusing it, with the field named, is the only way not to
//! alter an accepted event. The scan is iterative and allocates only for
//! the error's field path.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Default nesting limit (`runtime.max_json_depth`): serde_json's too.
pub const DEFAULT_MAX_DEPTH: usize = 128;

/// Highest limit a pipeline may set: a parser frame per level must still
/// fit a worker's 2 MiB stack with room to spare.
pub const LIMIT_MAX_DEPTH: usize = 1024;

static MAX_DEPTH: AtomicUsize = AtomicUsize::new(DEFAULT_MAX_DEPTH);

/// The nesting limit in force for every payload the process parses.
pub fn max_depth() -> usize {
    MAX_DEPTH.load(Ordering::Relaxed)
}

/// Sets the nesting limit (clamped to 1..=[`LIMIT_MAX_DEPTH`]); the engine
/// calls it once from the pipeline's `runtime.max_json_depth`.
pub fn set_max_depth(depth: usize) {
    MAX_DEPTH.store(depth.clamp(1, LIMIT_MAX_DEPTH), Ordering::Relaxed);
}

/// Why a JSON text was refused before parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Containers nested deeper than the limit.
    TooDeep { limit: usize, path: String },
    /// A number that would not come out as it came in.
    InexactNumber { path: String, number: String },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::TooDeep { limit, path } => {
                write!(f, "JSON nested deeper than {limit} levels at `{path}` (limit runtime.max_json_depth)")
            }
            Refusal::InexactNumber { path, number } => write!(
                f,
                "number {number} at `{path}` cannot be kept exactly: integers must fit in 64 bits \
                 and other numbers in a double without rounding (send it as a string)"
            ),
        }
    }
}

impl std::error::Error for Refusal {}

/// Why a JSON text is not taken: refused by the guard, or not JSON at all.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("{0}")]
    Refused(#[from] Refusal),
    #[error("{0}")]
    Syntax(#[from] sonic_rs::Error),
}

/// Parses a JSON text into a tree after [`check`]: the one way the product
/// builds a tree from text it did not write itself.
pub fn parse(text: &[u8]) -> Result<sonic_rs::Value, JsonError> {
    check(text)?;
    Ok(sonic_rs::from_slice(text)?)
}

/// Checks nesting depth against [`max_depth`] and every number for exactness.
/// Syntax is not judged here (the parser does that after): anything this
/// scan does not understand it steps over.
pub fn check(text: &[u8]) -> Result<(), Refusal> {
    check_with(text, max_depth())
}

/// [`check`] with an explicit nesting limit.
pub fn check_with(text: &[u8], limit: usize) -> Result<(), Refusal> {
    // One entry per open container: where its current key starts (objects)
    // or its current index (arrays). Only read to name a field in an error.
    let mut open: Vec<Slot> = Vec::new();
    let mut at = 0;
    while at < text.len() {
        match text[at] {
            b'"' => {
                let end = string_end(text, at + 1);
                if let Some(Slot::Object { key, expecting_key }) = open.last_mut() {
                    if *expecting_key {
                        *key = (at + 1, end.saturating_sub(1).max(at + 1));
                        *expecting_key = false;
                    }
                }
                at = end;
                continue;
            }
            b'{' | b'[' => {
                if open.len() == limit {
                    return Err(Refusal::TooDeep { limit, path: path_of(text, &open) });
                }
                open.push(if text[at] == b'{' {
                    Slot::Object { key: (at, at), expecting_key: true }
                } else {
                    Slot::Array { index: 0 }
                });
            }
            b'}' | b']' => {
                open.pop();
            }
            b',' => match open.last_mut() {
                Some(Slot::Object { expecting_key, .. }) => *expecting_key = true,
                Some(Slot::Array { index }) => *index += 1,
                None => {}
            },
            b'-' | b'0'..=b'9' => {
                let end = at + text[at..].iter().position(|b| !is_number_byte(*b)).unwrap_or(text.len() - at);
                let number = &text[at..end];
                if !is_exact(number) {
                    return Err(Refusal::InexactNumber { path: path_of(text, &open), number: shown(number) });
                }
                at = end;
                continue;
            }
            _ => {}
        }
        at += 1;
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Slot {
    Object { key: (usize, usize), expecting_key: bool },
    Array { index: usize },
}

/// Index just past the closing quote of a string whose content starts at `from`.
fn string_end(text: &[u8], mut from: usize) -> usize {
    while let Some(stop) = crate::check::string_stop(text, from) {
        match text[stop] {
            b'"' => return stop + 1,
            b'\\' => from = stop + 2,
            _ => from = stop + 1,
        }
    }
    text.len()
}

fn is_number_byte(b: u8) -> bool {
    matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
}

/// The field path of the innermost open container, e.g. `data.items[3]`.
fn path_of(text: &[u8], open: &[Slot]) -> String {
    let mut path = String::new();
    for slot in open {
        match *slot {
            Slot::Object { key: (start, end), expecting_key: false } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&String::from_utf8_lossy(&text[start..end.min(start + 64)]));
            }
            Slot::Object { .. } => {}
            Slot::Array { index } => path.push_str(&format!("[{index}]")),
        }
    }
    if path.is_empty() {
        path.push('.');
    }
    path
}

/// A number for an error message, cut short when long.
fn shown(number: &[u8]) -> String {
    let text = String::from_utf8_lossy(number);
    if text.chars().count() > 40 {
        format!("{}… ({} characters)", text.chars().take(24).collect::<String>(), number.len())
    } else {
        text.into_owned()
    }
}

/// Whether the parser keeps this number's value exactly: an integer in the
/// range of i64 or u64, or a number whose nearest double prints back as the
/// same decimal. Text that is no number at all is left to the parser.
pub fn is_exact(number: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(number) else { return true };
    if !text.bytes().any(|b| matches!(b, b'.' | b'e' | b'E')) {
        if text.parse::<i64>().is_ok() || text.parse::<u64>().is_ok() {
            return true;
        }
        if !text.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
            return true; // Not a number: the parser refuses it.
        }
    }
    let Ok(double) = text.parse::<f64>() else { return true };
    if !double.is_finite() {
        return false;
    }
    let Some(given) = Decimal::of(text) else { return true };
    let printed = Decimal::of(&format!("{double:e}")).expect("a double prints as a decimal");
    given == printed
}

/// A decimal as significant digits (no leading or trailing zeros) and the
/// power of ten of the first one; zero has no digits.
#[derive(Debug, PartialEq, Eq)]
struct Decimal {
    digits: Vec<u8>,
    exponent: i64,
}

impl Decimal {
    fn of(text: &str) -> Option<Decimal> {
        let text = text.strip_prefix('-').unwrap_or(text);
        let (mantissa, exp) = match text.find(['e', 'E']) {
            Some(i) => (&text[..i], text[i + 1..].parse::<i64>().ok()?),
            None => (text, 0),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let all: Vec<u8> = int.bytes().chain(frac.bytes()).collect();
        let lead = all.iter().take_while(|&&d| d == b'0').count();
        let digits: Vec<u8> = all[lead..].to_vec();
        let trail = digits.iter().rev().take_while(|&&d| d == b'0').count();
        let digits = digits[..digits.len() - trail].to_vec();
        let exponent = if digits.is_empty() { 0 } else { int.len() as i64 - lead as i64 - 1 + exp };
        Some(Decimal { digits, exponent })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_a_double_or_64_bit_integer_holds_pass() {
        for n in [
            "0",
            "-0",
            "1",
            "-1",
            "9223372036854775807",
            "-9223372036854775808",
            "18446744073709551615",
            "0.1",
            "129.5",
            "1.10",
            "1e2",
            "1E-5",
            "2.5e+3",
            "0.30000000000000004",
            "5e-324",
            "1.7976931348623157e308",
            "100.000",
            "0.0",
            "0e10",
        ] {
            assert!(is_exact(n.as_bytes()), "{n}");
        }
    }

    #[test]
    fn numbers_that_would_round_are_refused() {
        let hundred_digits = "1".repeat(100);
        for n in [
            "18446744073709551616",
            "-9223372036854775809",
            hundred_digits.as_str(),
            "1e-400",
            "1e400",
            "-1e400",
            "0.1234567890123456789",
            "123456789012345678.5",
            "1.00000000000000000001",
        ] {
            assert!(!is_exact(n.as_bytes()), "{n}");
        }
    }

    #[test]
    fn the_refusal_names_the_field() {
        let err = check(br#"{"a":{"b":[1,{"c":18446744073709551616}]}}"#).unwrap_err();
        assert_eq!(err, Refusal::InexactNumber { path: "a.b[1].c".into(), number: "18446744073709551616".into() });
        let err = check(br#"[1, 2, 1e-400]"#).unwrap_err();
        assert_eq!(err, Refusal::InexactNumber { path: "[2]".into(), number: "1e-400".into() });
        assert!(check(br#"{"s":"18446744073709551616 \" 1e-400","n":3}"#).is_ok(), "numbers in strings are text");
    }

    #[test]
    fn nesting_is_bounded_without_recursion() {
        let deep = "[".repeat(10_000);
        assert_eq!(check_with(deep.as_bytes(), 128), Err(Refusal::TooDeep { limit: 128, path: "[0]".repeat(128) }));
        let inside = format!(r#"{{"ok":1,"data":{{"x":{}}}}}"#, "[".repeat(200));
        assert!(matches!(check_with(inside.as_bytes(), 128), Err(Refusal::TooDeep { .. })));
        let fits = format!("{}{}", "[".repeat(128), "]".repeat(128));
        assert!(check_with(fits.as_bytes(), 128).is_ok());
        assert!(check_with(r#"{"s":"[[[[[[[[[[[[["}"#.as_bytes(), 2).is_ok(), "brackets in strings do not count");
    }
}
