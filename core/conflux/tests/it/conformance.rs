//! The output conformance suite (`conflux_testkit::conformance`) on the
//! `file`, `nats` (JetStream), `kafka`, `redis` and `postgres` outputs, against the real services.
//! Kafka runs without the fault cases: its broker advertises its own address,
//! so clients reach it around a proxy; kafka.rs takes the broker away with
//! librdkafka's mock cluster instead.

use std::time::{Duration, Instant};

use conflux_testkit::conformance::{run_all, OutputUnderTest};

use crate::setup;

fn ns_of_lines(text: &str) -> Vec<u64> {
    text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["n"].as_u64()).collect()
}

#[tokio::test]
async fn the_file_output_passes_the_conformance_suite() {
    setup();
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().to_path_buf();
    let read_folder = folder.clone();
    run_all(&OutputUnderTest {
        name: "file",
        output: Box::new(move |_, tag| format!("{{ type: file, path: \"{}/{tag}.ndjson\" }}", folder.display())),
        service: None,
        prepare: Box::new(|_| Box::pin(async {})),
        read_back: Box::new(move |tag, _| {
            let path = read_folder.join(format!("{tag}.ndjson"));
            Box::pin(async move { ns_of_lines(&std::fs::read_to_string(path).unwrap_or_default()) })
        }),
        refuses_by_template: false,
        at_least_once: false,
    })
    .await;
}

#[tokio::test]
async fn the_nats_jetstream_output_passes_the_conformance_suite() {
    setup();
    let url = crate::nats::nats_url().await;
    let service = url.trim_start_matches("nats://").to_string();
    let (prepare_url, read_url) = (url.clone(), url.clone());
    run_all(&OutputUnderTest {
        name: "nats",
        output: Box::new(|addr, tag| {
            format!("{{ type: nats, url: \"nats://{addr}\", jetstream: true, subject: \"cfc.{tag}.{{{{ route }}}}\", msg_id: \"{tag}-{{{{ n }}}}\" }}")
        }),
        service: Some(service),
        prepare: Box::new(move |tag| {
            let url = prepare_url.clone();
            Box::pin(async move {
                let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
                js.create_stream(async_nats::jetstream::stream::Config {
                    name: format!("CFC_{tag}"),
                    subjects: vec![format!("cfc.{tag}.>")],
                    ..Default::default()
                })
                .await
                .unwrap();
            })
        }),
        read_back: Box::new(move |tag, expected| {
            let url = read_url.clone();
            Box::pin(async move {
                let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
                let mut stream = js.get_stream(format!("CFC_{tag}")).await.unwrap();
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let last = stream.info().await.unwrap().state.last_sequence;
                    if last as usize >= expected || Instant::now() > deadline {
                        let mut ns = Vec::new();
                        for seq in 1..=last {
                            let message = stream.get_raw_message(seq).await.unwrap();
                            let payload: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
                            ns.push(payload["n"].as_u64().unwrap());
                        }
                        stream.delete_message(last.max(1)).await.ok();
                        js.delete_stream(format!("CFC_{tag}")).await.ok();
                        return ns;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        }),
        refuses_by_template: true,
        at_least_once: false,
    })
    .await;
}

#[tokio::test]
async fn the_kafka_output_passes_the_conformance_suite() {
    setup();
    let brokers = crate::kafka::brokers().await;
    let (prepare_brokers, read_brokers) = (brokers.clone(), brokers.clone());
    run_all(&OutputUnderTest {
        name: "kafka",
        // No fault proxy (see above): the output is given the broker itself.
        output: Box::new(move |_, tag| {
            format!("{{ type: kafka, brokers: [\"{brokers}\"], topic: \"{tag}_{{{{ route }}}}\" }}")
        }),
        service: None,
        prepare: Box::new(move |tag| {
            let brokers = prepare_brokers.clone();
            Box::pin(async move { crate::kafka::create_topic(&brokers, &format!("{tag}_r"), 1).await })
        }),
        read_back: Box::new(move |tag, expected| {
            let brokers = read_brokers.clone();
            Box::pin(async move {
                crate::kafka::read_back(&brokers, &[&format!("{tag}_r")], expected)
                    .await
                    .iter()
                    .map(|m| m.payload["n"].as_u64().unwrap())
                    .collect()
            })
        }),
        refuses_by_template: true,
        at_least_once: false,
    })
    .await;
}

/// `rpush` is the command a retried batch can apply twice (a list keeps
/// every push), so the suite counts duplicates through a cut instead of
/// failing on them; loss still fails.
#[tokio::test]
async fn the_redis_output_passes_the_conformance_suite() {
    use redis::AsyncCommands;
    setup();
    run_all(&OutputUnderTest {
        name: "redis",
        output: Box::new(|addr, tag| {
            format!("{{ type: redis, url: \"redis://{addr}\", commands: [{{ rpush: {{ key: \"cfc:{tag}:{{{{ route }}}}\" }} }}] }}")
        }),
        service: Some(crate::redis_output::REDIS.to_string()),
        prepare: Box::new(|_| Box::pin(async {})),
        read_back: Box::new(|tag, expected| {
            Box::pin(async move {
                let mut r = crate::redis_output::redis().await;
                let key = format!("cfc:{tag}:r");
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let items: Vec<String> = r.lrange(&key, 0, -1).await.unwrap();
                    if items.len() >= expected || Instant::now() > deadline {
                        let _: () = r.del(&key).await.unwrap();
                        return items
                            .iter()
                            .map(|i| serde_json::from_str::<serde_json::Value>(i).unwrap()["n"].as_u64().unwrap())
                            .collect();
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        }),
        refuses_by_template: true,
        at_least_once: true,
    })
    .await;
}

/// The `postgres` output in `copy` mode: every event a row of a table made
/// by `create: true`; the 7th events lack the `route` column and go to
/// `error`. A batch whose commit was not confirmed before a cut is written
/// again, so the suite counts duplicates instead of failing on them
/// (`exactly_once` is what removes them: postgres_output.rs and crash.rs).
#[tokio::test]
async fn the_postgres_output_passes_the_conformance_suite() {
    setup();
    run_all(&OutputUnderTest {
        name: "postgres",
        output: Box::new(|addr, tag| {
            format!(
                "{{ type: postgres, url: \"postgres://postgres@{addr}/postgres\", table: {tag}, create: true, columns: {{ n: {{ from: n, type: integer }}, route: {{ from: route, type: text }} }} }}"
            )
        }),
        service: Some("127.0.0.1:5432".to_string()),
        prepare: Box::new(|_| Box::pin(async {})),
        read_back: Box::new(|tag, expected| {
            Box::pin(async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let query = format!("SELECT n FROM {tag}");
                    let out = tokio::task::spawn_blocking(move || {
                        std::process::Command::new("psql")
                            .arg(crate::postgres_output::database_url())
                            .args(["-Atq", "-c", &query])
                            .output()
                            .expect("psql (scripts/test.sh starts PostgreSQL)")
                    })
                    .await
                    .unwrap();
                    let ns: Vec<u64> = String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.parse().ok()).collect();
                    if (out.status.success() && ns.len() >= expected) || Instant::now() > deadline {
                        crate::postgres_output::psql(&format!("DROP TABLE IF EXISTS {tag}"));
                        return ns;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        }),
        refuses_by_template: true,
        at_least_once: true,
    })
    .await;
}
