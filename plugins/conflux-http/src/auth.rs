//! Who is calling: API keys in a header, or JWTs (HS256 / RS256) with
//! `exp`, `nbf` and `aud` checked. Secrets never reach logs: [`Secret`]
//! prints as `***`.

use std::path::{Path, PathBuf};

use axum::http::HeaderMap;
use conflux_api::config::Duration;
use conflux_api::{BuildError, Value};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use schemars::JsonSchema;
use serde::Deserialize;

/// A secret option value (API key, JWT secret); never printed.
#[derive(Clone, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// How clients prove who they are. With both `api_keys` and `jwt`, either is accepted.
///
/// `401` answers a request with no credentials, a bad signature, or an
/// expired or not-yet-valid token; `403` a request whose credentials are
/// well-formed but not allowed (unknown API key, wrong audience or issuer).
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Static API keys sent in a header.
    #[serde(default)]
    pub api_keys: Option<ApiKeysConfig>,
    /// JSON Web Tokens sent as `Authorization: Bearer <token>`.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
}

/// Static API keys.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeysConfig {
    /// Header carrying the key.
    #[serde(default = "default_key_header")]
    pub header: String,
    /// Accepted keys (use `${VAR}` to keep them out of the file).
    pub keys: Vec<Secret>,
}

fn default_key_header() -> String {
    "x-api-key".into()
}

/// JWT verification. Give `secret` for HS256, `public_key` for RS256, or both.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Shared secret for HS256 tokens (use `${VAR}` to keep it out of the file).
    #[serde(default)]
    pub secret: Option<Secret>,
    /// PEM file with the RSA public key for RS256 tokens, relative to the pipeline file.
    #[serde(default)]
    pub public_key: Option<PathBuf>,
    /// Accepted audiences; when set, the `aud` claim must match one of them.
    #[serde(default)]
    pub audience: Vec<String>,
    /// Accepted issuers; when set, the `iss` claim must match one of them.
    #[serde(default)]
    pub issuer: Vec<String>,
    /// Claims copied into each event's metadata as `auth.claim.<name>` (the subject always goes to `auth.subject`).
    #[serde(default)]
    pub claims: Vec<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in whole seconds (default 0s).
    #[serde(default)]
    pub leeway: Option<Duration>,
}

/// Why a caller was turned away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No usable credentials, or they do not verify: `401`.
    #[error("{0}")]
    Unauthorized(String),
    /// Credentials are well-formed but not allowed here: `403`.
    #[error("{0}")]
    Forbidden(String),
}

/// An authenticated caller.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// Rate-limit key: `sub:<subject>` or `key#<index>` (never the key itself).
    pub client: Option<String>,
    /// Metadata entries to attach to each event.
    pub meta: Vec<(String, Value)>,
    /// Every claim of a JWT, for servers that decide by them (channel permissions).
    pub claims: Option<std::sync::Arc<serde_json::Value>>,
    /// A JWT's `exp` (seconds since the epoch): a long-lived connection is closed then.
    pub expires: Option<u64>,
}

/// The credentials a request carries.
#[derive(Debug, Default)]
pub struct Credentials<'a> {
    pub api_key: Option<&'a str>,
    pub bearer: Option<&'a str>,
}

/// Built authentication rules.
pub struct Auth {
    api: Option<(String, Vec<Secret>)>,
    jwt: Vec<(Algorithm, DecodingKey, Validation)>,
    claims: Vec<String>,
}

impl Auth {
    pub fn build(config: &AuthConfig, resolve: impl Fn(&Path) -> PathBuf) -> Result<Option<Auth>, BuildError> {
        if config.api_keys.is_none() && config.jwt.is_none() {
            return Ok(None);
        }
        let api = match &config.api_keys {
            Some(keys) if keys.keys.is_empty() => {
                return Err(BuildError::at(["auth", "api_keys", "keys"], "give at least one key"))
            }
            Some(keys) => {
                axum::http::HeaderName::try_from(keys.header.as_str())
                    .map_err(|e| BuildError::at(["auth", "api_keys", "header"], e.to_string()))?;
                Some((keys.header.to_ascii_lowercase(), keys.keys.clone()))
            }
            None => None,
        };
        let mut jwt = Vec::new();
        let mut claims = Vec::new();
        if let Some(config) = &config.jwt {
            let validation = |alg| {
                let mut v = Validation::new(alg);
                v.validate_nbf = true;
                v.leeway = config.leeway.map_or(0, |l| l.0.as_secs());
                if config.audience.is_empty() {
                    v.validate_aud = false;
                } else {
                    v.set_audience(&config.audience);
                }
                if !config.issuer.is_empty() {
                    v.set_issuer(&config.issuer);
                }
                v
            };
            if let Some(secret) = &config.secret {
                if secret.0.is_empty() {
                    return Err(BuildError::at(["auth", "jwt", "secret"], "the secret is empty"));
                }
                let key = DecodingKey::from_secret(secret.0.as_bytes());
                jwt.push((Algorithm::HS256, key, validation(Algorithm::HS256)));
            }
            if let Some(path) = &config.public_key {
                let pem = conflux_api::files::read_config_file(&resolve(path), conflux_api::files::CONFIG_FILE_LIMIT)
                    .map_err(|e| BuildError::at(["auth", "jwt", "public_key"], e.to_string()))?;
                let key = DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                    BuildError::at(["auth", "jwt", "public_key"], format!("not an RSA public key: {e}"))
                })?;
                jwt.push((Algorithm::RS256, key, validation(Algorithm::RS256)));
            }
            if jwt.is_empty() {
                return Err(BuildError::at(["auth", "jwt"], "give `secret` (HS256) or `public_key` (RS256)"));
            }
            claims = config.claims.clone();
        }
        Ok(Some(Auth { api, jwt, claims }))
    }

    /// The credentials in request headers.
    pub fn credentials<'h>(&self, headers: &'h HeaderMap) -> Credentials<'h> {
        let api_key = self.api.as_ref().and_then(|(name, _)| headers.get(name.as_str())).and_then(|v| v.to_str().ok());
        let bearer = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        Credentials { api_key, bearer }
    }

    /// Checks credentials; the identity names the client for rate limits.
    pub fn check(&self, credentials: &Credentials<'_>) -> Result<Identity, AuthError> {
        if let (Some(token), false) = (credentials.bearer, self.jwt.is_empty()) {
            return self.check_jwt(token);
        }
        if let (Some(given), Some((_, keys))) = (credentials.api_key, &self.api) {
            // Compare against every key, in constant time per key, so timing tells nothing.
            let mut found = None;
            for (i, key) in keys.iter().enumerate() {
                if constant_time_eq(given.as_bytes(), key.0.as_bytes()) {
                    found = Some(i);
                }
            }
            return match found {
                Some(i) => Ok(Identity { client: Some(format!("key#{i}")), ..Identity::default() }),
                None => Err(AuthError::Forbidden("unknown API key".into())),
            };
        }
        Err(AuthError::Unauthorized("missing credentials".into()))
    }

    fn check_jwt(&self, token: &str) -> Result<Identity, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Unauthorized(format!("malformed token: {e}")))?;
        let (_, key, validation) = self
            .jwt
            .iter()
            .find(|(alg, _, _)| *alg == header.alg)
            .ok_or_else(|| AuthError::Unauthorized(format!("token algorithm {:?} is not accepted", header.alg)))?;
        let data = jsonwebtoken::decode::<serde_json::Value>(token, key, validation).map_err(|e| match e.kind() {
            ErrorKind::InvalidAudience => AuthError::Forbidden("token audience is not accepted".into()),
            ErrorKind::InvalidIssuer => AuthError::Forbidden("token issuer is not accepted".into()),
            ErrorKind::ExpiredSignature => AuthError::Unauthorized("token expired".into()),
            ErrorKind::ImmatureSignature => AuthError::Unauthorized("token not valid yet (nbf)".into()),
            ErrorKind::InvalidSignature => AuthError::Unauthorized("bad token signature".into()),
            ErrorKind::MissingRequiredClaim(claim) => AuthError::Unauthorized(format!("token lacks `{claim}`")),
            _ => AuthError::Unauthorized(format!("invalid token: {e}")),
        })?;
        let claims = data.claims;
        let mut identity = Identity::default();
        if let Some(sub) = claims.get("sub").and_then(|s| s.as_str()) {
            identity.client = Some(format!("sub:{sub}"));
            identity.meta.push(("auth.subject".into(), Value::from(sub)));
        }
        for name in &self.claims {
            if let Some(value) = claims.get(name) {
                let value: Value = conflux_api::sonic_rs::from_str(&value.to_string()).unwrap_or_default();
                identity.meta.push((format!("auth.claim.{name}"), value));
            }
        }
        identity.expires = claims.get("exp").and_then(serde_json::Value::as_u64);
        identity.claims = Some(std::sync::Arc::new(claims));
        Ok(identity)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn hs_auth() -> Auth {
        let config = AuthConfig {
            api_keys: Some(ApiKeysConfig { header: "X-Api-Key".into(), keys: vec![Secret("k1".into())] }),
            jwt: Some(JwtConfig {
                secret: Some(Secret("s3cret".into())),
                public_key: None,
                audience: vec!["conflux".into()],
                issuer: vec![],
                claims: vec!["tenant".into()],
                leeway: None,
            }),
        };
        Auth::build(&config, |p| p.to_path_buf()).unwrap().unwrap()
    }

    fn token(claims: serde_json::Value) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(b"s3cret")).unwrap()
    }

    fn check(auth: &Auth, bearer: Option<&str>, key: Option<&str>) -> Result<Identity, AuthError> {
        auth.check(&Credentials { api_key: key, bearer })
    }

    #[test]
    fn jwt_claims_are_checked_and_copied() {
        let auth = hs_auth();
        let good = token(serde_json::json!({"sub": "u1", "aud": "conflux", "exp": now() + 60, "tenant": "t9"}));
        let id = check(&auth, Some(&good), None).unwrap();
        assert_eq!(id.client.as_deref(), Some("sub:u1"));
        assert_eq!(id.meta.len(), 2);
        let expired = token(serde_json::json!({"sub": "u1", "aud": "conflux", "exp": now() - 120}));
        assert!(matches!(check(&auth, Some(&expired), None), Err(AuthError::Unauthorized(_))));
        let early = token(serde_json::json!({"sub": "u1", "aud": "conflux", "exp": now() + 60, "nbf": now() + 600}));
        assert!(matches!(check(&auth, Some(&early), None), Err(AuthError::Unauthorized(_))));
        let wrong_aud = token(serde_json::json!({"sub": "u1", "aud": "other", "exp": now() + 60}));
        assert!(matches!(check(&auth, Some(&wrong_aud), None), Err(AuthError::Forbidden(_))));
        assert!(matches!(check(&auth, Some("not.a.jwt"), None), Err(AuthError::Unauthorized(_))));
    }

    #[test]
    fn api_keys_and_missing_credentials() {
        let auth = hs_auth();
        assert_eq!(check(&auth, None, Some("k1")).unwrap().client.as_deref(), Some("key#0"));
        assert!(matches!(check(&auth, None, Some("nope")), Err(AuthError::Forbidden(_))));
        assert!(matches!(check(&auth, None, None), Err(AuthError::Unauthorized(_))));
        assert_eq!(format!("{:?}", Secret("k1".into())), "***");
    }
}
