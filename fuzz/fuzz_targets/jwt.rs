//! JWT verification (HS256): arbitrary bearer tokens, and tokens whose
//! header and claims are fuzzed but correctly signed, so the claim checks
//! past the signature are reached too.
#![no_main]

use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use conflux_http::auth::{Auth, Credentials};
use conflux_http::AuthConfig;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

const SECRET: &[u8] = b"hush";

fn auth() -> &'static Auth {
    static AUTH: OnceLock<Auth> = OnceLock::new();
    AUTH.get_or_init(|| {
        let config: AuthConfig = serde_json::from_str(
            r#"{"jwt": {"secret": "hush", "audience": ["conflux"], "issuer": ["fuzz"],
                        "claims": ["tenant", "roles"], "leeway": "5s"}}"#,
        )
        .expect("the fuzz auth config deserializes");
        Auth::build(&config, |p| p.to_path_buf()).expect("the fuzz auth config builds").expect("auth is configured")
    })
}

/// `header.claims.signature` with an HS256 signature over the given parts.
fn signed(header: &[u8], claims: &[u8]) -> String {
    let mut token = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET).expect("HMAC takes any key length");
    mac.update(token.as_bytes());
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()));
    token
}

fuzz_target!(|data: &[u8]| {
    let auth = auth();
    let Some((&mode, rest)) = data.split_first() else { return };
    let token = match mode % 3 {
        // The input as it would come in an Authorization header.
        0 => match std::str::from_utf8(rest) {
            Ok(token) => token.to_owned(),
            Err(_) => return,
        },
        // Fuzzed claims under a fixed HS256 header, signed.
        1 => signed(br#"{"alg":"HS256","typ":"JWT"}"#, rest),
        // Fuzzed header and claims (split at the first 0xff), signed.
        _ => {
            let at = rest.iter().position(|b| *b == 0xff).unwrap_or(rest.len());
            signed(&rest[..at], rest.get(at + 1..).unwrap_or_default())
        }
    };
    let _ = auth.check(&Credentials { api_key: None, bearer: Some(&token) });
    let _ = auth.check(&Credentials { api_key: Some(&token), bearer: None });
});
