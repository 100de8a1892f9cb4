//! `http_server` input.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use conflux_api::config::ByteSize;
use conflux_api::{inventory, BuildContext, BuildError, BuiltInput, InputConfig, Registration};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::body::{parse, Format};
use crate::connections::{read_body, BodyError, ConnectionLimits};
use crate::front_door::{Gate, LimitScope};
use crate::intake::Intake;
use crate::server::error;
use crate::server_config;

server_config! {
    intake;
    /// Receives events over HTTP `POST`: a JSON object, a JSON array of objects,
    /// or NDJSON (`application/x-ndjson`); each request's events form one batch.
    ///
    /// Answers: `202` (`ack: async`) or `200` (`ack: sync`, once every output
    /// confirmed; `502` if one failed, `504` past `ack_timeout`) with
    /// `{"accepted": n}`; `400` malformed body (each bad array element by
    /// `index`, NDJSON line by `line`); `401`/`403` auth; `413` body over
    /// `max_body`; `415` other content types; `422` schema violations; `429`
    /// over the rate limit and `503` when the pipeline stays full past
    /// `queue_timeout`, both with `Retry-After`. Events carry metadata
    /// `http.path`, `auth.subject` and the chosen `auth.claim.<name>`.
    #[derive(Debug, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct HttpServerConfig {
        /// Largest accepted body; larger ones get `413`.
        #[serde(default = "default_max_body")]
        pub max_body: ByteSize,
        /// Most events handed to the pipeline in one batch (requests are combined up to this).
        #[serde(default = "default_max_batch")]
        pub max_batch: usize,
    }
}

fn default_max_body() -> ByteSize {
    ByteSize(1024 * 1024)
}

fn default_max_batch() -> usize {
    1024
}

impl InputConfig for HttpServerConfig {
    const TYPE: &'static str = "http_server";
    fn build(self, cx: &BuildContext) -> Result<BuiltInput, BuildError> {
        let (intake, rx) = self.intake_options().build(cx)?;
        let front = self.server_options().build(cx, LimitScope::PerClient)?;
        let state = Arc::new(HttpState {
            intake,
            gate: front.gate.clone(),
            max_body: self.max_body.0 as usize,
            limits: front.limits().clone(),
        });
        let route = post(ingest).layer(DefaultBodyLimit::disable());
        Ok(BuiltInput::new(front.into_input(route, state, rx, self.max_batch, "http_server")))
    }
}

inventory::submit!(Registration::input::<HttpServerConfig>());

struct HttpState {
    intake: Arc<Intake>,
    gate: Gate,
    max_body: usize,
    limits: ConnectionLimits,
}

async fn ingest(
    State(state): State<Arc<HttpState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    path: MatchedPath,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let identity = match state.gate.admit(&headers, None, peer) {
        Ok(identity) => identity,
        Err(response) => return *response,
    };
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let Some(format) = Format::of(content_type) else {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send application/json (object or array) or application/x-ndjson",
        );
    };
    let too_large = || error(StatusCode::PAYLOAD_TOO_LARGE, format!("body exceeds {} bytes", state.max_body));
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > state.max_body) {
        return too_large();
    }
    let bytes = match read_body(body, state.max_body, &state.limits).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return too_large(),
        Err(BodyError::TooSlow(reason)) => {
            let mut response = error(StatusCode::REQUEST_TIMEOUT, reason);
            response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
            return response;
        }
        Err(BodyError::Broken) => return error(StatusCode::BAD_REQUEST, "the body was broken off"),
    };
    let payloads = match parse(format, &bytes) {
        Ok(p) => p,
        Err(bad) => {
            let mut body = serde_json::json!({ "error": bad.reason });
            if !bad.elements.is_empty() {
                body["elements"] = serde_json::to_value(&bad.elements).unwrap_or_default();
            }
            return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
        }
    };
    state.intake.submit(payloads, bytes.len(), &identity, path.as_str()).await.into_response()
}
