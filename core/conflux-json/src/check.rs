//! A fast check that a line is one well-formed JSON value, for the inputs'
//! hot path (`Payload::from_json`).
//!
//! The check is one-sided: `true` means the text is valid JSON that
//! sonic-rs parses into a tree; `false` means "not sure" and the caller
//! asks sonic-rs, whose verdict (and error message) stands. So the rare
//! shapes this module does not want to reason about — `\u` escapes of
//! surrogates, exponents, long numbers, nesting deeper than [`MAX_DEPTH`] —
//! simply take the slower path, and no text is ever accepted here that
//! the parser would refuse later.
//!
//! Why not sonic-rs alone: skipping a value through serde's `IgnoredAny`
//! cost about half of the file → drop pipeline's CPU (0.7 µs for a 290-byte
//! event); this scanner reads strings eight bytes at a time.

/// Deeper nesting is left to the parser.
const MAX_DEPTH: usize = 128;

/// Longer numbers are left to the parser and `json_guard` (which decide
/// how big is too big); integers this short always fit an i64.
const MAX_NUMBER_LEN: usize = 18;

/// Digits of a number with a fraction that any double holds exactly.
const MAX_EXACT_FRACTION_DIGITS: usize = 15;

/// Whether `text` is certainly one JSON value (whitespace around it allowed).
/// UTF-8 is checked on the way: outside strings only ASCII is JSON, and
/// inside them each run of non-ASCII bytes is checked where the scan meets it.
/// Nesting deeper than [`crate::guard::max_depth`] is left to the parser's side too.
pub fn is_valid(text: &[u8]) -> bool {
    Checker { text, at: 0 }.document(crate::guard::max_depth().min(MAX_DEPTH))
}

struct Checker<'t> {
    text: &'t [u8],
    at: usize,
}

/// Whether `byte` ends a run of plain string content: `"`, `\\` and control
/// bytes always; bytes ≥ 0x80 too when the scan checks UTF-8 (`NON_ASCII`).
fn is_stop<const NON_ASCII: bool>(byte: u8) -> bool {
    byte < 0x20 || byte == b'"' || byte == b'\\' || (NON_ASCII && byte >= 0x80)
}

/// Bit 7 of each byte of `word` that [`is_stop`]. Only the lowest set bit
/// is exact (borrows may set higher ones), which is all the scan uses.
fn word_stops<const NON_ASCII: bool>(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
    let non_ascii = if NON_ASCII { word & HIGH } else { 0 };
    control | non_ascii | zero_byte(word ^ (ONES * u64::from(b'"'))) | zero_byte(word ^ (ONES * u64::from(b'\\')))
}

/// The index of the first stop at or after `from`: where a string scan must
/// look closer. Eight bytes at a time (a vector version measured slower
/// without `unsafe`, which the workspace forbids).
fn first_stop<const NON_ASCII: bool>(text: &[u8], mut from: usize) -> Option<usize> {
    while let Some(chunk) = text.get(from..from + 8) {
        let stops = word_stops::<NON_ASCII>(u64::from_le_bytes(chunk.try_into().expect("eight bytes")));
        if stops != 0 {
            return Some(from + (stops.trailing_zeros() / 8) as usize);
        }
        from += 8;
    }
    text.get(from..)?.iter().position(|&b| is_stop::<NON_ASCII>(b)).map(|i| from + i)
}

/// The index of the first byte at or after `from` that is a quote, a
/// backslash or a control byte: where a scan of checked text must look closer.
pub(crate) fn string_stop(text: &[u8], from: usize) -> Option<usize> {
    first_stop::<false>(text, from)
}

impl Checker<'_> {
    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    /// Consumes `byte` after optional whitespace.
    fn eat(&mut self, byte: u8) -> bool {
        self.skip_ws();
        if self.peek() == Some(byte) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    /// The whole text: one value, then only whitespace. Containers are
    /// tracked on an explicit stack (`true` = object), so depth costs no recursion.
    fn document(&mut self, max_depth: usize) -> bool {
        let mut stack = [false; MAX_DEPTH];
        let mut depth = 0;
        'value: loop {
            self.skip_ws();
            let Some(first) = self.peek() else { return false };
            self.at += 1;
            match first {
                b'{' | b'[' => {
                    let object = first == b'{';
                    if self.eat(if object { b'}' } else { b']' }) {
                        // Empty container: a complete value.
                    } else {
                        if depth == max_depth {
                            return false;
                        }
                        stack[depth] = object;
                        depth += 1;
                        if object && !self.key() {
                            return false;
                        }
                        continue 'value;
                    }
                }
                b'"' => {
                    if !self.string() {
                        return false;
                    }
                }
                b'-' | b'0'..=b'9' => {
                    if !self.number() {
                        return false;
                    }
                }
                b't' => {
                    if !self.literal(b"rue") {
                        return false;
                    }
                }
                b'f' => {
                    if !self.literal(b"alse") {
                        return false;
                    }
                }
                b'n' => {
                    if !self.literal(b"ull") {
                        return false;
                    }
                }
                _ => return false,
            }
            // After a complete value: close containers or go on to the next member.
            loop {
                self.skip_ws();
                if depth == 0 {
                    return self.at == self.text.len();
                }
                let object = stack[depth - 1];
                match self.peek() {
                    Some(b',') => {
                        self.at += 1;
                        if object && !self.key() {
                            return false;
                        }
                        continue 'value;
                    }
                    Some(b'}') if object => depth -= 1,
                    Some(b']') if !object => depth -= 1,
                    _ => return false,
                }
                self.at += 1;
            }
        }
    }

    /// An object key and its colon.
    fn key(&mut self) -> bool {
        self.eat(b'"') && self.string() && self.eat(b':')
    }

    /// The rest of a string, after its opening quote.
    fn string(&mut self) -> bool {
        loop {
            let Some(stop) = first_stop::<true>(self.text, self.at) else { return false };
            self.at = stop + 1;
            let byte = self.text[stop];
            match byte {
                b'"' => return true,
                b'\\' if self.escape() => {}
                0x80.. => {
                    // A run of non-ASCII bytes: UTF-8 sequences never
                    // contain ASCII, so each run is checked on its own.
                    let run = self.text[stop..].iter().position(|b| b.is_ascii()).unwrap_or(self.text.len() - stop);
                    if std::str::from_utf8(&self.text[stop..stop + run]).is_err() {
                        return false;
                    }
                    self.at = stop + run;
                }
                // A bad escape, or a control byte.
                _ => return false,
            }
        }
    }

    /// The rest of an escape, after its backslash.
    fn escape(&mut self) -> bool {
        let Some(kind) = self.peek() else { return false };
        self.at += 1;
        match kind {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => true,
            b'u' => {
                let Some(hex) = self.text.get(self.at..self.at + 4) else { return false };
                let Some(code) = std::str::from_utf8(hex).ok().and_then(|h| u16::from_str_radix(h, 16).ok()) else {
                    return false;
                };
                self.at += 4;
                // Surrogates (paired or lone) are the parser's business.
                !(0xD800..=0xDFFF).contains(&code) && hex.iter().all(u8::is_ascii_hexdigit)
            }
            _ => false,
        }
    }

    /// The rest of a number, after its first byte: `-?(0|[1-9][0-9]*)(\.[0-9]+)?`.
    /// Exponents and long numbers are left to the parser.
    fn number(&mut self) -> bool {
        let start = self.at - 1;
        let digits = |c: &mut Self| {
            let from = c.at;
            while let Some(b'0'..=b'9') = c.peek() {
                c.at += 1;
            }
            c.at - from
        };
        let first = self.text[start];
        let lead = if first == b'-' {
            let Some(b) = self.peek() else { return false };
            self.at += 1;
            b
        } else {
            first
        };
        let mut count = 1;
        match lead {
            b'0' => {}
            b'1'..=b'9' => {
                count += digits(self);
            }
            _ => return false,
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            let fraction = digits(self);
            // Up to 15 significant digits a double always holds exactly;
            // longer fractions are for `json_guard` to judge.
            if fraction == 0 || count + fraction > MAX_EXACT_FRACTION_DIGITS {
                return false;
            }
        }
        !matches!(self.peek(), Some(b'e' | b'E' | b'0'..=b'9')) && self.at - start <= MAX_NUMBER_LEN
    }

    fn literal(&mut self, rest: &[u8]) -> bool {
        if self.text[self.at..].starts_with(rest) {
            self.at += rest.len();
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sonic_rs::Value;

    const VALID: &[&str] = &[
        r#"{"type":"booking_created","timestamp":"2026-11-22T10:00:00Z","data":{"bookingId":"b-1","guests":4,"price":129.5,"zone":"terrace","tags":["a","b"],"vip":true,"note":null}}"#,
        r#"{}"#,
        r#"[]"#,
        r#"[1,2,3]"#,
        r#"  { "a" : [ 1 , { "b" : "c" } ] , "d" : -0.5 }  "#,
        r#""just a string""#,
        "42",
        "-0",
        "0.25",
        "true",
        "false",
        "null",
        r#"{"esc":"a\"b\\c\/d\b\f\n\r\t\u00e9\u20ac"}"#,
        r#"{"long":"this string is long enough to take several eight-byte steps, ünïcödé included"}"#,
        r#"{"nested":[[[[[[[[{"deep":[{}]}]]]]]]]]}"#,
        r#"{"a":"","b":"x","c":"12345678","d":"123456789"}"#,
    ];

    /// Texts only the parser may decide on (valid or not): the check says "not sure".
    const LEFT_TO_THE_PARSER: &[&str] = &[
        r#"{"n":1e5}"#,
        r#"{"n":1.5E-3}"#,
        r#"{"n":123456789012345678901234567890}"#,
        r#"{"s":"\ud83d\ude00"}"#,
        r#"{"s":"\ud83d"}"#,
        r#"{"s":"\udc00x"}"#,
    ];

    const INVALID: &[&str] = &[
        "",
        "   ",
        "{",
        "}",
        "[1,]",
        "[,1]",
        r#"{"a":1,}"#,
        r#"{"a" 1}"#,
        r#"{"a":}"#,
        r#"{a:1}"#,
        r#"{"a":1 "b":2}"#,
        r#"{"a":[1}"#,
        r#"{"a":{1:2}}"#,
        r#"["a]"#,
        r#""a"#,
        r#""tab	inside""#,
        r#""\x""#,
        r#""\u12G4""#,
        r#""\u12""#,
        "01",
        "-",
        "-a",
        "1.",
        ".5",
        "+1",
        "tru",
        "nul",
        "truex",
        "[true false]",
        "{} {}",
        "1 2",
        "NaN",
        "[1]]",
        "[[1]",
    ];

    fn parses(text: &[u8]) -> bool {
        sonic_rs::from_slice::<Value>(text).is_ok()
    }

    /// The wide scans find the same first stop as a byte-by-byte one, from
    /// every offset of texts with a stop at every place.
    #[test]
    fn finds_the_first_stop_at_any_offset() {
        let plain = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
        for stop in [b'"', b'\\', 0x00, 0x1f, 0x80, 0xc3, 0xff] {
            for place in 0..=plain.len() {
                let mut text = plain.to_vec();
                text.insert(place, stop);
                text.push(b'"');
                for from in 0..text.len() {
                    let expected = |non_ascii: bool| {
                        text[from..]
                            .iter()
                            .position(|&b| b < 0x20 || b == b'"' || b == b'\\' || (non_ascii && b >= 0x80))
                            .map(|i| from + i)
                    };
                    let context = format!("stop {stop:#x} at {place}, from {from}");
                    assert_eq!(first_stop::<false>(&text, from), expected(false), "{context}");
                    assert_eq!(first_stop::<true>(&text, from), expected(true), "{context}");
                }
            }
        }
    }

    #[test]
    fn accepts_the_common_shapes() {
        for text in VALID {
            assert!(is_valid(text.as_bytes()), "{text}");
            assert!(parses(text.as_bytes()), "{text}");
        }
    }

    #[test]
    fn leaves_rare_shapes_to_the_parser() {
        for text in LEFT_TO_THE_PARSER {
            assert!(!is_valid(text.as_bytes()), "{text}");
        }
    }

    #[test]
    fn refuses_what_is_not_json() {
        for text in INVALID {
            assert!(!is_valid(text.as_bytes()), "{text:?}");
            assert!(!parses(text.as_bytes()), "the parser refuses {text:?} too");
        }
        for text in [
            &b"{\"a\":\"\xff\"}"[..],
            b"{\"a\":\"\xc3\"}",
            b"{\"a\":\"x\xc3\"}",
            b"{\"a\":\"\xc3x\"}",
            b"{\"a\":\"\xc0\x80\"}",
            b"{\"a\":\"\xed\xa0\x80\"}",
            b"{\"a\":\"0123456789abcdef\xe2\x82\"}",
            b"{\"\xff\":1}",
            b"{\"a\":1}\xc2\xa0",
            b"\xc3\xa9",
        ] {
            assert!(!is_valid(text), "not UTF-8, or not ASCII outside a string: {text:?}");
            assert!(!parses(text), "the parser refuses {text:?} too");
        }
        let deep = "[".repeat(MAX_DEPTH + 2) + &"]".repeat(MAX_DEPTH + 2);
        assert!(!is_valid(deep.as_bytes()), "deeper than the stack: the parser decides");
    }

    /// Every single-byte deletion, and every replacement by a byte that
    /// matters to JSON, of every valid text: whatever the check accepts,
    /// the parser accepts too.
    #[test]
    fn never_accepts_what_the_parser_refuses() {
        const BYTES: &[u8] = b"{}[]\",:\\ -+.0123456789eEtfnu\x00\x1f\x7fa\x80\xa9\xc3\xe2\xff";
        let mut accepted = 0;
        for text in VALID.iter().chain(LEFT_TO_THE_PARSER) {
            let bytes = text.as_bytes();
            let mut candidates = Vec::new();
            for i in 0..bytes.len() {
                let mut cut = bytes.to_vec();
                cut.remove(i);
                candidates.push(cut);
                for &b in BYTES {
                    let mut changed = bytes.to_vec();
                    changed[i] = b;
                    candidates.push(changed.clone());
                    changed.insert(i, b);
                    candidates.push(changed);
                }
            }
            for candidate in candidates {
                if is_valid(&candidate) {
                    accepted += 1;
                    assert!(
                        parses(&candidate),
                        "accepted but the parser refuses: {}",
                        String::from_utf8_lossy(&candidate)
                    );
                }
            }
        }
        assert!(accepted > 1000, "the mutations include plenty of valid texts ({accepted})");
    }
}
