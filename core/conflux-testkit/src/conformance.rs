//! The tests every output passes, against its real service: connect and
//! close, a batch round trip, acknowledgement only after the write, errored
//! when the service is gone, refused events to the `error` port alone, no
//! loss through a reconnect, and `/ready` false while the service is away.
//! An output's test file describes how to configure it and read back what
//! it wrote; [`run_all`] does the rest, with a [`FaultProxy`] in front of the
//! service to take it away without stopping the shared server.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use conflux_api::AckStatus;
use conflux_engine::runtime::RunContext;

use crate::fault_proxy::FaultProxy;
use crate::{acks, delivered, run_yaml};

/// A future the suite awaits.
pub type Pending<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// (service address, unique tag) → the output's mapping.
pub type OutputYaml = Box<dyn Fn(&str, &str) -> String + Send + Sync>;

/// One output under test.
pub struct OutputUnderTest {
    pub name: &'static str,
    /// The output's mapping given (service address, unique tag): e.g.
    /// `{ type: nats, url: "nats://{addr}", jetstream: true, subject: "cf.{tag}.x" }`.
    /// Where its topic, subject or key is a template it should use `{{ route }}`
    /// (set on every event but those refused on purpose, see [`run_all`]).
    pub output: OutputYaml,
    /// The service's own address (`127.0.0.1:4222`), or `None` for an output
    /// without one (a file): the fault cases are then skipped.
    pub service: Option<String>,
    /// Makes the service ready for a tag (creates a topic or a stream).
    pub prepare: Box<dyn Fn(String) -> Pending<()> + Send + Sync>,
    /// The `n` of every event the service holds for a tag, duplicates kept;
    /// waits until at least `expected` are there (or gives up and returns what is).
    pub read_back: Box<dyn Fn(String, usize) -> Pending<Vec<u64>> + Send + Sync>,
    /// Whether the output can refuse single events (its topic or subject is a
    /// template over `route`): then the refused-event case runs.
    pub refuses_by_template: bool,
    /// Whether a write retried after a cut may store an event twice (the
    /// service has no id to deduplicate on): the reconnect case then reports
    /// duplicates instead of failing on them. Loss always fails.
    pub at_least_once: bool,
}

fn key(name: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("cf{name}{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Runs every case that applies; panics naming the output and the case.
pub async fn run_all(o: &OutputUnderTest) {
    let case = |name: &str| eprintln!("conformance of `{}`: {name}", o.name);
    case("round trip");
    round_trip(o).await;
    case("refused events go to the error port alone");
    refused_events_go_to_the_error_port_alone(o).await;
    if let Some(service) = &o.service {
        case("acknowledged only after the write");
        acknowledged_only_after_the_write(o, service).await;
        case("errored and down while the service is gone");
        errored_and_down_while_the_service_is_gone(o, service).await;
        case("nothing lost (nor duplicated) through a reconnect");
        nothing_lost_through_a_reconnect(o, service).await;
    }
}

fn pipeline(source: &str, output: &str, extra_outputs: &str) -> String {
    routed(source, output, extra_outputs, "")
}

/// [`pipeline`] whose `route` stage is given `options` (`, skip_multiples_of: 7`).
fn routed(source: &str, output: &str, extra_outputs: &str, options: &str) -> String {
    format!(
        "runtime: {{ shutdown_timeout: 5s }}
inputs:
  src: {source}
stages:
  route: {{ type: test_route, from: src{options} }}
outputs:
  out: {output}
{extra_outputs}"
    )
}

/// Adds `from: route` (and any engine options) to an output mapping `{ … }`.
fn wired(output: &str, extra: &str) -> String {
    let inner = output.trim().trim_start_matches('{').trim_end_matches('}').trim();
    format!("{{ {inner}, from: route{extra} }}")
}

fn address(o: &OutputUnderTest, proxy: Option<&FaultProxy>) -> String {
    proxy.map(FaultProxy::host_port).or_else(|| o.service.clone()).unwrap_or_default()
}

async fn round_trip(o: &OutputUnderTest) {
    let (tag, src) = (key("rt"), key("src"));
    (o.prepare)(tag.clone()).await;
    let output = wired(&(o.output)(&address(o, None), &tag), ", batch: { max_events: 64 }");
    let yaml = pipeline(&format!("{{ type: test_source, key: {src}, count: 300, batch_size: 50 }}"), &output, "");
    let report = run_yaml(&yaml, RunContext::new()).await;
    assert!(!report.failed, "{}: round trip: the run failed: {report:?}", o.name);
    assert_eq!(acks(&src), vec![AckStatus::Delivered; 300], "{}: round trip: every event acknowledged", o.name);
    let mut got = (o.read_back)(tag, 300).await;
    got.sort_unstable();
    assert_eq!(got, (0..300).collect::<Vec<u64>>(), "{}: round trip: each event written once", o.name);
}

async fn refused_events_go_to_the_error_port_alone(o: &OutputUnderTest) {
    if !o.refuses_by_template {
        return;
    }
    let (tag, src, dead) = (key("refuse"), key("src"), key("dead"));
    (o.prepare)(tag.clone()).await;
    let output = wired(&(o.output)(&address(o, None), &tag), "");
    let dead_letter = format!("  dead: {{ type: test_sink, key: {dead}, from: out.error }}\n");
    let yaml = routed(
        &format!("{{ type: test_source, key: {src}, count: 50, batch_size: 25 }}"),
        &output,
        &dead_letter,
        &format!(", skip_multiples_of: {REFUSE_EVERY}"),
    );
    run_yaml(&yaml, RunContext::new()).await;
    let refused: Vec<u64> = (0..50).filter(|n| n % REFUSE_EVERY == 0).collect();
    let mut dead_ns: Vec<u64> = delivered(&dead).iter().filter_map(|v| v["n"].as_u64()).collect();
    dead_ns.sort_unstable();
    assert_eq!(dead_ns, refused, "{}: only the events without `route` are dead-lettered", o.name);
    let mut got = (o.read_back)(tag, 50 - refused.len()).await;
    got.sort_unstable();
    let kept: Vec<u64> = (0..50).filter(|n| n % REFUSE_EVERY != 0).collect();
    assert_eq!(got, kept, "{}: their batch-mates are written, once", o.name);
    assert_eq!(acks(&src), vec![AckStatus::Delivered; 50], "{}: a dead-lettered event counts as delivered", o.name);
}

async fn acknowledged_only_after_the_write(o: &OutputUnderTest, service: &str) {
    let (tag, src) = (key("ack"), key("src"));
    (o.prepare)(tag.clone()).await;
    let proxy = FaultProxy::start(service).await.expect("fault proxy");
    let output = wired(&(o.output)(&address(o, Some(&proxy)), &tag), "");
    let source = format!("{{ type: test_source, key: {src}, count: 30, batch_size: 1, interval: 100ms }}");
    let yaml = pipeline(&source, &output, "");
    let cx = RunContext::new();
    let run = tokio::spawn({
        let cx = cx.clone();
        async move { run_yaml(&yaml, cx).await }
    });
    // Writing first, then nothing passes: no acknowledgement may arrive.
    wait_until(|| acks(&src).len() >= 3, Duration::from_secs(20), "the first events to be written").await;
    proxy.stall();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = acks(&src).len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(acks(&src).len(), before, "{}: events were acknowledged while the service received nothing", o.name);
    proxy.restore();
    run.await.expect("run");
    assert_eq!(acks(&src), vec![AckStatus::Delivered; 30], "{}: acknowledged once written", o.name);
    let got = (o.read_back)(tag, 30).await;
    assert!((0..30).all(|n| got.contains(&n)), "{}: every event written: {got:?}", o.name);
}

async fn errored_and_down_while_the_service_is_gone(o: &OutputUnderTest, service: &str) {
    let (tag, src) = (key("gone"), key("src"));
    (o.prepare)(tag.clone()).await;
    let proxy = FaultProxy::start(service).await.expect("fault proxy");
    proxy.cut();
    let output = wired(
        &(o.output)(&address(o, Some(&proxy)), &tag),
        ", retry: { initial_backoff: 50ms, max_backoff: 200ms, max_attempts: 2 }",
    );
    let yaml = pipeline(&format!("{{ type: test_source, key: {src}, count: 10, batch_size: 10 }}"), &output, "");
    let cx = RunContext::new();
    let run = tokio::spawn({
        let cx = cx.clone();
        async move { run_yaml(&yaml, cx).await }
    });
    wait_until(
        || cx.readiness.not_ready().down.iter().any(|(component, _)| component.ends_with("/out")),
        Duration::from_secs(60),
        "the output to be reported down",
    )
    .await;
    run.await.expect("run");
    let statuses = acks(&src);
    assert_eq!(statuses.len(), 10, "{}: every event answered", o.name);
    assert!(statuses.iter().all(|s| *s == AckStatus::Errored), "{}: failed back, not delivered: {statuses:?}", o.name);
}

async fn nothing_lost_through_a_reconnect(o: &OutputUnderTest, service: &str) {
    let (tag, src) = (key("reconnect"), key("src"));
    (o.prepare)(tag.clone()).await;
    let proxy = FaultProxy::start(service).await.expect("fault proxy");
    let output =
        wired(&(o.output)(&address(o, Some(&proxy)), &tag), ", retry: { initial_backoff: 50ms, max_backoff: 500ms }");
    let yaml = pipeline(
        &format!("{{ type: test_source, key: {src}, count: 200, batch_size: 5, interval: 20ms }}"),
        &output,
        "",
    );
    let cx = RunContext::new();
    let run = tokio::spawn({
        let cx = cx.clone();
        async move { run_yaml(&yaml, cx).await }
    });
    wait_until(|| acks(&src).len() >= 40, Duration::from_secs(30), "some events delivered").await;
    proxy.cut();
    wait_until(
        || !cx.readiness.not_ready().down.is_empty(),
        Duration::from_secs(60),
        "the output to be reported down while cut away",
    )
    .await;
    proxy.restore();
    run.await.expect("run");
    let statuses = acks(&src);
    assert_eq!(statuses, vec![AckStatus::Delivered; 200], "{}: every event delivered across the cut", o.name);
    let got = (o.read_back)(tag, 200).await;
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for n in &got {
        *counts.entry(*n).or_default() += 1;
    }
    let missing: Vec<u64> = (0..200).filter(|n| !counts.contains_key(n)).collect();
    assert!(missing.is_empty(), "{}: lost across the reconnect: {missing:?}", o.name);
    let twice: Vec<(u64, usize)> = counts.into_iter().filter(|(_, c)| *c > 1).collect();
    if o.at_least_once {
        eprintln!(
            "conformance of `{}`: {} events stored more than once across the cut (at least once)",
            o.name,
            twice.len()
        );
    } else {
        assert!(twice.is_empty(), "{}: stored more than once across the reconnect (n, times): {twice:?}", o.name);
    }
}

/// In the refusal case, events whose `n` is a multiple of this get no `route`.
pub const REFUSE_EVERY: u64 = 7;

async fn wait_until(mut done: impl FnMut() -> bool, within: Duration, what: &str) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < within, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
