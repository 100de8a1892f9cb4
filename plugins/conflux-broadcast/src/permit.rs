//! Which channels a client may read: patterns such as
//! `restaurant:{claims.restaurant_id}` (an owner sees theirs) or
//! `restaurant:*` (an admin sees all), filled in from the claims of the
//! client's token when it connects. A claim's value is always literal: a
//! `*` inside it matches only a `*`, so no token can widen its own reach.

use std::fmt;

/// Why a pattern does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternError(String);

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PatternError {}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    /// `{claims.a.b}`: the claim path, dot-separated.
    Claim(String),
    /// `*`: any run of characters.
    Any,
}

/// A channel pattern, parsed once at build time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    parts: Vec<Part>,
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Pattern, PatternError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            match c {
                '*' => {
                    if !literal.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Any);
                    rest = &rest[1..];
                }
                '{' => {
                    let end = rest.find('}').ok_or_else(|| PatternError(format!("`{{` without `}}` in `{text}`")))?;
                    let inner = rest[1..end].trim();
                    let path = inner.strip_prefix("claims.").filter(|p| !p.is_empty()).ok_or_else(|| {
                        PatternError(format!(
                            "`{{{inner}}}` in `{text}`: a placeholder names a claim, `{{claims.name}}`"
                        ))
                    })?;
                    if !literal.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Claim(path.to_string()));
                    rest = &rest[end + 1..];
                }
                _ => {
                    literal.push(c);
                    rest = &rest[c.len_utf8()..];
                }
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        if parts.is_empty() {
            return Err(PatternError("an empty channel pattern".into()));
        }
        Ok(Pattern { parts })
    }
}

/// A run of a filled-in pattern: literal text, or any run of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Any,
}

/// The channels one client may read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permit {
    allowed: Vec<Vec<Piece>>,
}

impl Permit {
    /// Fills each pattern from the client's claims (`claim` gives a claim's
    /// value as text by its dot path). A pattern naming a claim the token
    /// does not carry grants nothing.
    pub fn new<'p>(patterns: impl IntoIterator<Item = &'p Pattern>, claim: impl Fn(&str) -> Option<String>) -> Permit {
        let mut allowed = Vec::new();
        'patterns: for pattern in patterns {
            let mut pieces: Vec<Piece> = Vec::new();
            for part in &pattern.parts {
                let text = match part {
                    Part::Any => {
                        pieces.push(Piece::Any);
                        continue;
                    }
                    Part::Text(t) => t.clone(),
                    Part::Claim(path) => match claim(path) {
                        Some(value) if !value.is_empty() => value,
                        _ => continue 'patterns,
                    },
                };
                match pieces.last_mut() {
                    Some(Piece::Literal(last)) => last.push_str(&text),
                    _ => pieces.push(Piece::Literal(text)),
                }
            }
            allowed.push(pieces);
        }
        Permit { allowed }
    }

    /// Whether the client may read `channel`.
    pub fn allows(&self, channel: &str) -> bool {
        self.allowed.iter().any(|pieces| matches(pieces, channel))
    }
}

/// Glob match of literal pieces and `Any` runs (no backtracking blow-up:
/// each literal after an `Any` is taken at its first occurrence, which is
/// enough for a pattern without character classes).
fn matches(pieces: &[Piece], text: &str) -> bool {
    let mut at = 0;
    let mut floating = false;
    for (i, piece) in pieces.iter().enumerate() {
        match piece {
            Piece::Any => floating = true,
            Piece::Literal(literal) => {
                let last = i == pieces.len() - 1;
                if !floating {
                    if !text[at..].starts_with(literal.as_str()) {
                        return false;
                    }
                    at += literal.len();
                } else if last {
                    // The last literal after a `*` must end the text.
                    return text.len() - at >= literal.len() && text.ends_with(literal.as_str());
                } else {
                    match text[at..].find(literal.as_str()) {
                        Some(found) => at += found + literal.len(),
                        None => return false,
                    }
                }
                floating = false;
            }
        }
    }
    floating || at == text.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn permit(patterns: &[&str], claims: &[(&str, &str)]) -> Permit {
        let patterns: Vec<Pattern> = patterns.iter().map(|p| Pattern::parse(p).unwrap()).collect();
        Permit::new(&patterns, |path| claims.iter().find(|(k, _)| *k == path).map(|(_, v)| v.to_string()))
    }

    #[test]
    fn owners_read_their_channel_and_admins_every_one() {
        let owner = permit(&["restaurant:{claims.restaurant_id}"], &[("restaurant_id", "r7")]);
        assert!(owner.allows("restaurant:r7"));
        assert!(!owner.allows("restaurant:r70"));
        assert!(!owner.allows("restaurant:r8"));
        assert!(!owner.allows("restaurant:"));
        let admin = permit(&["restaurant:*"], &[]);
        assert!(admin.allows("restaurant:r7") && admin.allows("restaurant:"));
        assert!(!admin.allows("orders:r7"));
    }

    #[test]
    fn a_claim_never_widens_the_pattern_and_a_missing_one_grants_nothing() {
        let sly = permit(&["restaurant:{claims.restaurant_id}"], &[("restaurant_id", "*")]);
        assert!(!sly.allows("restaurant:r7"), "a `*` in a claim is literal");
        assert!(sly.allows("restaurant:*"));
        let none = permit(&["restaurant:{claims.restaurant_id}", "public"], &[]);
        assert!(!none.allows("restaurant:"));
        assert!(none.allows("public"));
    }

    #[test]
    fn wildcards_anywhere() {
        let p = permit(&["tenant:{claims.t}:*:live", "*:news"], &[("t", "acme")]);
        assert!(p.allows("tenant:acme:orders:live"));
        assert!(!p.allows("tenant:acme:orders:live2"));
        assert!(!p.allows("tenant:other:orders:live"));
        assert!(p.allows("x:news") && p.allows(":news"));
        assert!(!p.allows("news"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!(Pattern::parse("a:{claims.x").is_err());
        assert!(Pattern::parse("a:{tenant}").is_err());
        assert!(Pattern::parse("").is_err());
    }
}
