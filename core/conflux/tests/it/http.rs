//! `http_server`, `websocket_server` and `validate` through real pipeline
//! files: every answer code is provoked here.

use std::net::SocketAddr;
use std::time::Duration;

use conflux_engine::runtime::{RunContext, RunReport};
use conflux_testkit::{delivered, release, run_yaml};
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::{fixture, free_addr, key, setup, wait_listening};

/// A pipeline running in the background with its server listening.
pub struct Running {
    pub addr: SocketAddr,
    pub cx: RunContext,
    handle: tokio::task::JoinHandle<RunReport>,
}

impl Running {
    /// `yaml` may use `{addr}` for the server's address.
    pub async fn start(yaml: &str) -> Running {
        setup();
        let addr = free_addr();
        let yaml = yaml.replace("{addr}", &addr.to_string());
        let cx = RunContext::new();
        let handle = tokio::spawn({
            let cx = cx.clone();
            async move { run_yaml(&yaml, cx).await }
        });
        wait_listening(addr).await;
        Running { addr, cx, handle }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn stop(self) -> RunReport {
        self.cx.stop.cancel();
        self.handle.await.unwrap()
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap()
}

async fn post(
    url: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (StatusCode, Value, reqwest::header::HeaderMap) {
    let response = client().post(url).header("content-type", content_type).body(body).send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    (status, body, headers)
}

async fn wait_delivered(key: &str, n: usize) -> Vec<Value> {
    for _ in 0..300 {
        if delivered(key).len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    delivered(key)
}

#[tokio::test]
async fn http_accepts_object_array_and_ndjson_with_202() {
    let sink = key("sink");
    let run = Running::start(&format!(
        "inputs:\n  api: {{ type: http_server, address: \"{{addr}}\", path: [/events, /v2/events] }}\noutputs:\n  out: {{ type: test_sink, key: {sink}, from: api }}\n"
    ))
    .await;
    let (status, body, _) = post(&run.url("/events"), "application/json", r#"{"n":1}"#).await;
    assert_eq!((status, body), (StatusCode::ACCEPTED, json!({"accepted": 1})));
    let (status, body, _) =
        post(&run.url("/v2/events"), "application/json; charset=utf-8", r#"[{"n":2},{"n":3}]"#).await;
    assert_eq!((status, body), (StatusCode::ACCEPTED, json!({"accepted": 2})));
    let (status, body, _) =
        post(&run.url("/events"), "application/x-ndjson", "{\"n\":4}\n{\"n\":5}\n\n{\"n\":6}\n").await;
    assert_eq!((status, body), (StatusCode::ACCEPTED, json!({"accepted": 3})));
    let got = wait_delivered(&sink, 6).await;
    let mut ns: Vec<u64> = got.iter().map(|v| v["n"].as_u64().unwrap()).collect();
    ns.sort_unstable();
    assert_eq!(ns, vec![1, 2, 3, 4, 5, 6]);
    let report = run.stop().await;
    assert!(!report.failed);
}

#[tokio::test]
async fn http_400_names_each_bad_element() {
    let sink = key("sink");
    let run = Running::start(&format!(
        "inputs:\n  api: {{ type: http_server, address: \"{{addr}}\" }}\noutputs:\n  out: {{ type: test_sink, key: {sink}, from: api }}\n"
    ))
    .await;
    let (status, body, _) = post(&run.url("/"), "application/json", r#"[{"n":1}, 7, {"n": }, {"n":3}]"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let indexes: Vec<u64> = body["elements"].as_array().unwrap().iter().map(|e| e["index"].as_u64().unwrap()).collect();
    assert_eq!(indexes, vec![1, 2], "{body}");
    let (status, body, _) = post(&run.url("/"), "application/json", r#"[{"n":1}, "x", true]"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["elements"].as_array().unwrap().len(), 2, "{body}");
    let (status, body, _) = post(&run.url("/"), "application/x-ndjson", "{\"n\":1}\nnot json\n").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["elements"][0]["line"], 2, "{body}");
    let (status, body, _) = post(&run.url("/"), "application/json", "{\"n\":").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().unwrap().contains("malformed JSON"), "{body}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(delivered(&sink).is_empty(), "nothing of a refused request enters the pipeline");
    run.stop().await;
}

#[tokio::test]
async fn http_413_over_max_body_and_415_for_other_content_types() {
    let sink = key("sink");
    let run = Running::start(&format!(
        "inputs:\n  api: {{ type: http_server, address: \"{{addr}}\", max_body: 1KiB }}\noutputs:\n  out: {{ type: test_sink, key: {sink}, from: api }}\n"
    ))
    .await;
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(2000));
    let (status, _, _) = post(&run.url("/"), "application/json", big.clone()).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // Chunked, so the server cannot rely on Content-Length.
    let stream = futures_util::stream::iter(vec![Ok::<_, std::io::Error>(big.into_bytes())]);
    let (status, _, _) = post(&run.url("/"), "application/json", reqwest::Body::wrap_stream(stream)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, body, _) = post(&run.url("/"), "text/plain", "n=1").await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{body}");
    let (status, _, _) = post(&run.url("/"), "application/json", r#"{"n":1}"#).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    run.stop().await;
}

#[tokio::test]
async fn http_sync_ack_answers_200_only_after_every_output_confirmed() {
    let (fast, slow) = (key("fast"), key("slow"));
    let run = Running::start(&format!(
        "inputs:\n  api: {{ type: http_server, address: \"{{addr}}\", ack: sync }}\noutputs:\n  fast: {{ type: test_sink, key: {fast}, from: api }}\n  slow: {{ type: test_sink, key: {slow}, gated: true, from: api }}\n"
    ))
    .await;
    let url = run.url("/");
    let request = tokio::spawn(async move { post(&url, "application/json", r#"[{"n":1},{"n":2}]"#).await });
    wait_delivered(&fast, 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!request.is_finished(), "answered before the gated output confirmed");
    release(&slow, 1);
    let (status, body, _) = request.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"accepted": 2, "delivered": 2}));
    run.stop().await;
}

#[tokio::test]
async fn http_sync_ack_answers_502_when_an_output_fails_and_504_past_the_timeout() {
    let (bad, stuck) = (key("bad"), key("stuck"));
    let run = Running::start(&format!(
        "inputs:\n  api: {{ type: http_server, address: \"{{addr}}\", ack: sync }}\noutputs:\n  out: {{ type: test_sink, key: {bad}, fatal: true, from: api }}\n"
    ))
    .await;
    let (status, body, _) = post(&run.url("/"), "application/json", r#"{"n":1}"#).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    run.stop().await;

    let run = Running::start(&format!(
        "runtime: {{ shutdown_timeout: 200ms }}\ninputs:\n  api: {{ type: http_server, address: \"{{addr}}\", ack: sync, ack_timeout: 300ms }}\noutputs:\n  out: {{ type: test_sink, key: {stuck}, gated: true, from: api }}\n"
    ))
    .await;
    let (status, body, _) = post(&run.url("/"), "application/json", r#"{"n":1}"#).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    run.stop().await;
}

#[tokio::test]
async fn http_503_with_retry_after_when_the_pipeline_stays_full() {
    let sink = key("sink");
    let run = Running::start(&format!(
        "runtime: {{ channel_capacity: 1, shutdown_timeout: 200ms }}\ninputs:\n  api: {{ type: http_server, address: \"{{addr}}\", queue: 1, queue_timeout: 100ms, max_batch: 1 }}\noutputs:\n  out: {{ type: test_sink, key: {sink}, gated: true, from: api }}\n"
    ))
    .await;
    let mut seen = Vec::new();
    for i in 0..20 {
        let (status, _, headers) = post(&run.url("/"), "application/json", format!(r#"{{"n":{i}}}"#)).await;
        seen.push(status);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(headers.get("retry-after").unwrap(), "1");
            break;
        }
    }
    assert_eq!(seen.last(), Some(&StatusCode::SERVICE_UNAVAILABLE), "{seen:?}");
    assert!(seen.len() >= 3, "a few requests fit before the pipeline is full: {seen:?}");
    run.stop().await;
}

#[tokio::test]
async fn http_429_with_retry_after_per_client() {
    let sink = key("sink");
    let run = Running::start(&format!(
        "inputs:
  api:
    type: http_server
    address: \"{{addr}}\"
    auth: {{ api_keys: {{ keys: [alpha, beta] }} }}
    rate_limit: {{ per_client: 2/min }}
outputs:
  out: {{ type: test_sink, key: {sink}, from: api }}
"
    ))
    .await;
    let send = |k: &'static str| {
        let url = run.url("/");
        async move {
            let r = client()
                .post(url)
                .header("content-type", "application/json")
                .header("x-api-key", k)
                .body("{}")
                .send()
                .await
                .unwrap();
            (r.status(), r.headers().get("retry-after").map(|v| v.to_str().unwrap().parse::<u64>().unwrap()))
        }
    };
    assert_eq!(send("alpha").await.0, StatusCode::ACCEPTED);
    assert_eq!(send("alpha").await.0, StatusCode::ACCEPTED);
    let (status, retry) = send("alpha").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(retry.is_some_and(|s| (1..=30).contains(&s)), "{retry:?}");
    assert_eq!(send("beta").await.0, StatusCode::ACCEPTED, "another client has its own bucket");
    // Wrong keys are charged to the caller's address: guessing is throttled too.
    assert_eq!(send("guess-1").await.0, StatusCode::FORBIDDEN);
    assert_eq!(send("guess-2").await.0, StatusCode::FORBIDDEN);
    let (status, retry) = send("guess-3").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "the third wrong key from one address");
    assert!(retry.is_some());
    assert_eq!(send("beta").await.0, StatusCode::ACCEPTED, "a valid key keeps its own bucket");
    run.stop().await;
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

#[tokio::test]
async fn http_401_and_403_for_api_keys_and_jwt_hs256_rs256() {
    let sink = key("sink");
    let run = Running::start(&format!(
        "inputs:
  api:
    type: http_server
    address: \"{{addr}}\"
    auth:
      api_keys: {{ header: x-key, keys: [k-123] }}
      jwt: {{ secret: hush, public_key: {}, audience: [conflux], claims: [tenant] }}
outputs:
  out: {{ type: test_sink, key: {sink}, from: api }}
",
        fixture("jwt-rs256-public.pem")
    ))
    .await;
    let url = run.url("/");
    let send = |auth: Option<(&'static str, String)>| {
        let url = url.clone();
        async move {
            let mut request = client().post(url).header("content-type", "application/json").body("{}");
            if let Some((name, value)) = auth {
                request = request.header(name, value);
            }
            request.send().await.unwrap().status()
        }
    };
    let hs =
        |claims: Value| encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(b"hush")).unwrap();
    let rs_key = EncodingKey::from_rsa_pem(&std::fs::read(fixture("jwt-rs256-private.pem")).unwrap()).unwrap();
    let rs = |claims: Value| encode(&Header::new(Algorithm::RS256), &claims, &rs_key).unwrap();
    let bearer = |t: String| Some(("authorization", format!("Bearer {t}")));

    assert_eq!(send(None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(send(Some(("x-key", "k-123".into()))).await, StatusCode::ACCEPTED);
    assert_eq!(send(Some(("x-key", "wrong".into()))).await, StatusCode::FORBIDDEN);
    let good = json!({"sub": "u1", "aud": "conflux", "exp": now() + 60, "tenant": "t1"});
    assert_eq!(send(bearer(hs(good.clone()))).await, StatusCode::ACCEPTED);
    assert_eq!(send(bearer(rs(good))).await, StatusCode::ACCEPTED);
    assert_eq!(
        send(bearer(hs(json!({"sub": "u1", "aud": "conflux", "exp": now() - 300})))).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(bearer(rs(json!({"sub": "u1", "aud": "conflux", "exp": now() + 60, "nbf": now() + 600})))).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(send(bearer(hs(json!({"sub": "u1", "aud": "other", "exp": now() + 60})))).await, StatusCode::FORBIDDEN);
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "u1", "aud": "conflux", "exp": now() + 60}),
        &EncodingKey::from_secret(b"guess"),
    )
    .unwrap();
    assert_eq!(send(bearer(forged)).await, StatusCode::UNAUTHORIZED);
    assert_eq!(wait_delivered(&sink, 3).await.len(), 3);
    run.stop().await;
}

/// Behind JWT auth, each subject has its own rate bucket, and the subject
/// and the configured claims reach the event's metadata (a script copies
/// them into the payload so the sink can see them).
#[tokio::test]
async fn jwt_subjects_get_their_own_rate_bucket_and_reach_the_metadata() {
    let sink = key("sink");
    let run = Running::start(&format!(
        "inputs:
  api:
    type: http_server
    address: \"{{addr}}\"
    auth: {{ jwt: {{ secret: hush, claims: [tenant] }} }}
    rate_limit: {{ per_client: 2/min }}
stages:
  who:
    type: rhai
    from: api
    script: |
      event.subject = meta[\"auth.subject\"];
      event.tenant = meta[\"auth.claim.tenant\"];
      event
outputs:
  out: {{ type: test_sink, key: {sink}, from: who }}
"
    ))
    .await;
    let token = |sub: &str, tenant: &str| {
        let claims = json!({"sub": sub, "tenant": tenant, "exp": now() + 60});
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(b"hush")).unwrap()
    };
    let send = |token: String, n: u32| {
        let url = run.url("/");
        async move {
            let response = client()
                .post(url)
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {token}"))
                .body(format!("{{\"n\":{n}}}"))
                .send()
                .await
                .unwrap();
            response.status()
        }
    };
    let (u1, u2) = (token("u1", "t1"), token("u2", "t2"));
    assert_eq!(send(u1.clone(), 1).await, StatusCode::ACCEPTED);
    assert_eq!(send(u1.clone(), 2).await, StatusCode::ACCEPTED);
    assert_eq!(send(u1, 3).await, StatusCode::TOO_MANY_REQUESTS, "u1's bucket is empty");
    assert_eq!(send(u2, 4).await, StatusCode::ACCEPTED, "u2, from the same address, has its own bucket");
    let mut got = wait_delivered(&sink, 3).await;
    got.sort_by_key(|e| e["n"].as_u64());
    assert_eq!(
        got,
        vec![
            json!({"n": 1, "subject": "u1", "tenant": "t1"}),
            json!({"n": 2, "subject": "u1", "tenant": "t1"}),
            json!({"n": 4, "subject": "u2", "tenant": "t2"}),
        ]
    );
    run.stop().await;
}

fn schema_file(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("order.json");
    std::fs::write(
        &path,
        r#"{"type":"object","required":["id","qty"],"properties":{"id":{"type":"string"},"qty":{"type":"integer","minimum":1}}}"#,
    )
    .unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn http_422_lists_each_violation_with_its_element_index() {
    let (all, some) = (key("all"), key("some"));
    let dir = tempfile::tempdir().unwrap();
    let schema = schema_file(&dir);
    let run = Running::start(&format!(
        "inputs:\n  api: {{ type: http_server, address: \"{{addr}}\", schema: {schema} }}\noutputs:\n  out: {{ type: test_sink, key: {all}, from: api }}\n"
    ))
    .await;
    let mixed = r#"[{"id":"a","qty":1},{"id":7,"qty":0},{"qty":2}]"#;
    let (status, body, _) = post(&run.url("/"), "application/json", mixed).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let violations = body["violations"].as_array().unwrap();
    let at: Vec<(u64, &str)> =
        violations.iter().map(|v| (v["index"].as_u64().unwrap(), v["path"].as_str().unwrap())).collect();
    assert!(at.contains(&(1, "/id")) && at.contains(&(1, "/qty")) && at.iter().any(|(i, _)| *i == 2), "{body}");
    assert!(violations.iter().all(|v| !v["reason"].as_str().unwrap().is_empty()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(delivered(&all).is_empty(), "reject_all refuses the valid ones too");
    run.stop().await;

    let run = Running::start(&format!(
        "inputs:\n  api: {{ type: http_server, address: \"{{addr}}\", schema: {schema}, partial: accept_valid }}\noutputs:\n  out: {{ type: test_sink, key: {some}, from: api }}\n"
    ))
    .await;
    let (status, body, _) = post(&run.url("/"), "application/json", mixed).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["accepted"], 1);
    assert_eq!(wait_delivered(&some, 1).await, vec![json!({"id":"a","qty":1})]);
    let (status, _, _) = post(&run.url("/"), "application/json", r#"{"qty":0}"#).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "nothing valid: 422");
    run.stop().await;
}

#[tokio::test]
async fn cors_preflight_allows_configured_origins_only() {
    let sink = key("sink");
    let run = Running::start(&format!(
        "inputs:\n  api: {{ type: http_server, address: \"{{addr}}\", cors: {{ allow_origins: [\"https://app.example\"], max_age: 10m }} }}\noutputs:\n  out: {{ type: test_sink, key: {sink}, from: api }}\n"
    ))
    .await;
    let preflight = |origin: &'static str| {
        client()
            .request(reqwest::Method::OPTIONS, run.url("/"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
    };
    let ok = preflight("https://app.example").await.unwrap();
    assert_eq!(ok.headers().get("access-control-allow-origin").unwrap(), "https://app.example");
    assert_eq!(ok.headers().get("access-control-max-age").unwrap(), "600");
    let other = preflight("https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    run.stop().await;
}

#[tokio::test]
async fn https_with_certificate_and_key_files() {
    let sink = key("sink");
    let run = Running::start(&format!(
        "inputs:\n  api: {{ type: http_server, address: \"{{addr}}\", tls: {{ cert: {}, key: {} }} }}\noutputs:\n  out: {{ type: test_sink, key: {sink}, from: api }}\n",
        fixture("tls-cert.pem"),
        fixture("tls-key.pem")
    ))
    .await;
    let cert = reqwest::Certificate::from_pem(&std::fs::read(fixture("tls-ca.pem")).unwrap()).unwrap();
    let tls_client = reqwest::Client::builder().add_root_certificate(cert).build().unwrap();
    let url = format!("https://localhost:{}/", run.addr.port());
    let response =
        tls_client.post(&url).header("content-type", "application/json").body(r#"{"n":1}"#).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(wait_delivered(&sink, 1).await, vec![json!({"n": 1})]);
    let plain = client().post(run.url("/")).header("content-type", "application/json").body("{}").send().await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success(), "plain HTTP is not served");
    run.stop().await;
}

#[tokio::test]
async fn shipped_event_schemas_accept_what_the_generator_produces() {
    setup();
    for (profile, schema) in [("booking", "booking"), ("clickstream", "clickstream")] {
        let (ok, bad) = (key("ok"), key("bad"));
        let schema = format!("{}/../../schemas/events/{schema}.json", env!("CARGO_MANIFEST_DIR"));
        let yaml = format!(
            "inputs:\n  gen: {{ type: generate, profile: {profile}, count: 2000, seed: 3 }}\nstages:\n  check: {{ type: validate, schema: {schema}, from: gen }}\noutputs:\n  ok: {{ type: test_sink, key: {ok}, from: check }}\n  bad: {{ type: test_sink, key: {bad}, from: check.invalid }}\n"
        );
        run_yaml(&yaml, RunContext::new()).await;
        assert_eq!(delivered(&ok).len(), 2000, "{profile}: {:?}", delivered(&bad).first());
        assert!(delivered(&bad).is_empty());
    }
}

#[tokio::test]
async fn validate_stage_routes_every_invalid_event_and_counts_it() {
    setup();
    let (src, ok, bad) = (key("src"), key("ok"), key("bad"));
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("even.json");
    std::fs::write(&schema, r#"{"properties":{"n":{"type":"integer","multipleOf":2}}}"#).unwrap();
    let yaml = format!(
        "inputs:\n  src: {{ type: test_source, key: {src}, count: 10, batch_size: 5 }}\nstages:\n  check: {{ type: validate, schema: {}, from: src }}\noutputs:\n  ok: {{ type: test_sink, key: {ok}, from: check }}\n  bad: {{ type: test_sink, key: {bad}, from: check.invalid }}\n",
        schema.display()
    );
    let cx = RunContext::new();
    run_yaml(&yaml, cx.clone()).await;
    assert_eq!(delivered(&ok).len(), 5);
    assert_eq!(delivered(&bad).len(), 5);
    let metrics = cx.metrics.encode();
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("conflux_events_sent_total")
                && l.contains(r#"component="check""#)
                && l.contains(r#"port="invalid""#)
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(line.ends_with(" 5"), "{line}");

    // Unwired, invalid events are rejected back to the source, never delivered silently.
    let (src2, ok2) = (key("src"), key("ok"));
    let yaml = format!(
        "inputs:\n  src: {{ type: test_source, key: {src2}, count: 4, batch_size: 1 }}\nstages:\n  check: {{ type: validate, schema: {}, from: src }}\noutputs:\n  ok: {{ type: test_sink, key: {ok2}, from: check }}\n",
        schema.display()
    );
    run_yaml(&yaml, RunContext::new()).await;
    let acks = conflux_testkit::acks(&src2);
    assert_eq!(acks.iter().filter(|s| **s == conflux_api::AckStatus::Rejected).count(), 2, "{acks:?}");
}

async fn ws_connect(
    url: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

async fn ws_send<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, text: &str) -> Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::Text(text.into())).await.unwrap();
    loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Text(reply) => return serde_json::from_str(&reply).unwrap(),
            _ => continue,
        }
    }
}

#[tokio::test]
async fn websocket_acknowledges_each_message_with_the_same_rules() {
    let sink = key("sink");
    let dir = tempfile::tempdir().unwrap();
    let schema = schema_file(&dir);
    let run = Running::start(&format!(
        "inputs:
  ws:
    type: websocket_server
    address: \"{{addr}}\"
    path: /ingest
    ack: sync
    max_message: 256B
    schema: {schema}
    auth: {{ api_keys: {{ keys: [k1] }} }}
    rate_limit: {{ per_connection: 4/min }}
outputs:
  out: {{ type: test_sink, key: {sink}, from: ws }}
"
    ))
    .await;
    let base = format!("ws://{}/ingest", run.addr);
    let refused = tokio_tungstenite::connect_async(base.as_str()).await.unwrap_err();
    assert!(refused.to_string().contains("401"), "{refused}");
    let refused = tokio_tungstenite::connect_async(format!("{base}?token=nope")).await.unwrap_err();
    assert!(refused.to_string().contains("403"), "{refused}");
    // Failed credentials at the upgrade are charged to the caller's address
    // (4 a minute here, two spent above by the 401 and the 403): guessing keys soon gets 429.
    let mut answers = Vec::new();
    for _ in 0..30 {
        answers.push(tokio_tungstenite::connect_async(format!("{base}?token=guess")).await.unwrap_err().to_string());
    }
    assert!(answers[..2].iter().all(|a| a.contains("403")), "{answers:?}");
    assert!(answers[2..].iter().all(|a| a.contains("429")), "{answers:?}");

    let mut ws = ws_connect(&format!("{base}?token=k1")).await;
    let r = ws_send(&mut ws, r#"[{"id":"a","qty":1},{"id":"b","qty":2}]"#).await;
    assert_eq!((r["seq"].clone(), r["status"].clone(), r["accepted"].clone()), (json!(1), json!(200), json!(2)), "{r}");
    let r = ws_send(&mut ws, r#"{"id":"a","qty":0}"#).await;
    assert_eq!(r["status"], 422, "{r}");
    assert_eq!(r["violations"][0]["path"], "/qty");
    let r = ws_send(&mut ws, r#"[{"id":"a","qty":1}, oops]"#).await;
    assert_eq!(r["status"], 400, "{r}");
    assert_eq!(r["elements"][0]["index"], 1);
    let r = ws_send(&mut ws, &format!(r#"{{"id":"{}","qty":1}}"#, "x".repeat(300))).await;
    assert_eq!(r["status"], 413, "{r}");
    let r = ws_send(&mut ws, r#"{"id":"c","qty":3}"#).await;
    assert_eq!((r["seq"].clone(), r["status"].clone()), (json!(5), json!(429)), "four messages per minute: {r}");
    assert!(r["retry_after"].as_u64().unwrap() >= 1);
    assert_eq!(delivered(&sink).len(), 2);
    ws.close(None).await.ok();
    run.stop().await;
}

/// `websocket_server` over TLS (`wss://`), authenticated by a JWT in the
/// upgrade request's `Authorization` header: refused without it, and the
/// subject and claims reach each event's metadata.
#[tokio::test]
async fn websocket_over_tls_with_a_jwt_bearer() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let sink = key("sink");
    let run = Running::start(&format!(
        "inputs:
  ws:
    type: websocket_server
    address: \"{{addr}}\"
    path: /ingest
    tls: {{ cert: {}, key: {} }}
    auth: {{ jwt: {{ secret: hush, claims: [tenant] }} }}
stages:
  who:
    type: rhai
    from: ws
    script: |
      event.subject = meta[\"auth.subject\"];
      event.tenant = meta[\"auth.claim.tenant\"];
      event
outputs:
  out: {{ type: test_sink, key: {sink}, from: who }}
",
        fixture("tls-cert.pem"),
        fixture("tls-key.pem")
    ))
    .await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(fixture("tls-ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let url = format!("wss://localhost:{}/ingest", run.addr.port());
    let connect = |bearer: Option<String>| {
        let (connector, url, addr) = (connector.clone(), url.clone(), run.addr);
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let stream = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
            let mut request = url.into_client_request().unwrap();
            if let Some(token) = bearer {
                request.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
            }
            tokio_tungstenite::client_async(request, stream).await.map(|(ws, _)| ws)
        }
    };
    let refused = connect(None).await.unwrap_err();
    assert!(refused.to_string().contains("401"), "{refused}");
    let claims = json!({"sub": "u7", "tenant": "t7", "exp": now() + 60});
    let token = encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(b"hush")).unwrap();
    let mut ws = connect(Some(token)).await.unwrap();
    let reply = ws_send(&mut ws, r#"{"n":1}"#).await;
    assert_eq!((reply["status"].clone(), reply["accepted"].clone()), (json!(202), json!(1)), "{reply}");
    assert_eq!(wait_delivered(&sink, 1).await, vec![json!({"n": 1, "subject": "u7", "tenant": "t7"})]);
    ws.close(None).await.ok();
    run.stop().await;
}
