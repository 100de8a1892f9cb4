//! Small config value types shared by plugins: durations, byte sizes, rates.
//!
//! Each parses from the human form ops write (`5m`, `16KiB`, `100/min`),
//! and describes itself in the JSON Schema as a patterned string. Parse
//! errors never quote the text: it may come from `${VAR}` and be a secret.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

macro_rules! string_config_type {
    ($ty:ident, $name:literal, $pattern:literal, $desc:literal) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl de::Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($desc)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$ty, E> {
                        // The parse error leaves the text out (it may be a secret from
                        // `${VAR}`); say what was found instead.
                        v.parse().map_err(|e| E::custom(format!("{e} (found {})", crate::registry::describe_str(v))))
                    }
                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<$ty, E> {
                        self.visit_str(&v.to_string())
                    }
                }
                d.deserialize_any(V)
            }
        }
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl JsonSchema for $ty {
            fn schema_name() -> Cow<'static, str> {
                $name.into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({ "type": "string", "pattern": $pattern, "description": $desc })
            }
        }
    };
}

/// A duration written as `250ms`, `5s`, `5m`, `1h`, `7d` (combinations like `1h30m` too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub std::time::Duration);

impl FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "0" {
            return Ok(Duration(std::time::Duration::ZERO));
        }
        humantime::parse_duration(s)
            .map(Duration)
            .map_err(|_| "invalid duration; write e.g. 500ms, 5s, 5m, 1h, 7d".to_string())
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Duration {
    pub const fn from_secs(s: u64) -> Self {
        Duration(std::time::Duration::from_secs(s))
    }
    pub const fn from_millis(ms: u64) -> Self {
        Duration(std::time::Duration::from_millis(ms))
    }
}

string_config_type!(
    Duration,
    "Duration",
    // humantime's grammar: numbers (with fractions) and unit words, spaces allowed.
    "^\\s*(0|([0-9]+(\\.[0-9]+)?\\s*(nanos|nsec|ns|usec|us|µs|millis|msec|ms|seconds|second|secs|sec|s|minutes|minute|mins|min|m|hours|hour|hrs|hr|h|days|day|d|weeks|week|wks|wk|w|months|month|M|years|year|yrs|yr|y)\\s*)+)$",
    "a duration such as 500ms, 5s, 5m, 1h or 7d"
);

/// A size in bytes written as `512`, `16KiB`, `1MiB`, `64KB`, `1GB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits.parse().map_err(|_| "invalid size; write e.g. 512, 16KiB, 1MiB".to_string())?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return Err("unknown size unit; use B, KiB, MiB, GiB, KB, MB or GB".to_string()),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(|| "size is too large".to_string())
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n >= 1 << 30 && n.is_multiple_of(1 << 30) {
            write!(f, "{}GiB", n >> 30)
        } else if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
            write!(f, "{}MiB", n >> 20)
        } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
            write!(f, "{}KiB", n >> 10)
        } else {
            write!(f, "{n}")
        }
    }
}

string_config_type!(
    ByteSize,
    "ByteSize",
    "^[0-9]+\\s*(B|KiB|MiB|GiB|KB|kB|MB|GB)?$",
    "a size such as 512, 16KiB or 1MiB"
);

/// A rate written as `COUNT/UNIT`: `100/min`, `1000/s`, `10/1s`, `5000/h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: u64,
    pub per: std::time::Duration,
}

impl Rate {
    /// Events per second as a float.
    pub fn per_second(&self) -> f64 {
        self.count as f64 / self.per.as_secs_f64()
    }
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || "invalid rate; write COUNT/UNIT such as 100/min, 1000/s or 10/5s".to_string();
        let (count, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u64 = count.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => std::time::Duration::from_secs(1),
            "m" | "min" | "minute" => std::time::Duration::from_secs(60),
            "h" | "hour" => std::time::Duration::from_secs(3600),
            "d" | "day" => std::time::Duration::from_secs(86_400),
            other => humantime::parse_duration(other).map_err(|_| bad())?,
        };
        if count == 0 || per.is_zero() {
            return Err("a rate must be positive".to_string());
        }
        Ok(Rate { count, per })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, humantime::format_duration(self.per))
    }
}

string_config_type!(Rate, "Rate", "^[0-9]+\\s*/\\s*[0-9a-z]+$", "a rate such as 100/min, 1000/s or 10/5s");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_human_forms() {
        assert_eq!("5m".parse::<Duration>().unwrap().0.as_secs(), 300);
        assert_eq!("250ms".parse::<Duration>().unwrap().0.as_millis(), 250);
        assert!("five".parse::<Duration>().is_err());
        assert_eq!("16KiB".parse::<ByteSize>().unwrap().0, 16 * 1024);
        assert_eq!("2MB".parse::<ByteSize>().unwrap().0, 2_000_000);
        assert!("3 parsecs".parse::<ByteSize>().is_err());
        let r: Rate = "100/min".parse().unwrap();
        assert_eq!((r.count, r.per.as_secs()), (100, 60));
        assert!("0/s".parse::<Rate>().is_err());
        assert!("fast".parse::<Rate>().is_err());
    }

    #[test]
    fn deserializes_from_yaml_shapes() {
        let d: Duration = serde_json::from_str("\"1h\"").unwrap();
        assert_eq!(d.0.as_secs(), 3600);
        let b: ByteSize = serde_json::from_str("1024").unwrap();
        assert_eq!(b.0, 1024);
        let err = serde_json::from_str::<Rate>("\"lots\"").unwrap_err().to_string();
        assert!(err.contains("COUNT/UNIT"), "{err}");
    }
}
