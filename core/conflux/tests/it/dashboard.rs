//! The dashboard page in a real browser: the quickstart runs in the real
//! binary, headless Chromium (driven by playwright-core from npm, as
//! `scripts/services.sh` installs them) loads the admin page, sees the
//! widgets fill from the broadcast output's SSE and the figures change as
//! events arrive, and saves a screenshot (`dashboard.png` in cargo's test
//! folder, for a person to look at).

use std::path::PathBuf;
use std::time::Duration;

pub(crate) fn browser_dir() -> PathBuf {
    let dir = std::env::var("CONFLUX_BROWSER_DIR").unwrap_or_else(|_| "/tmp/conflux-services/browser".into());
    let dir = PathBuf::from(dir);
    assert!(
        dir.join("node_modules/playwright-core").is_dir() && std::path::Path::new("/usr/bin/chromium").exists(),
        "the dashboard test needs Debian's chromium and playwright-core in {}: run `scripts/test.sh` (it installs both)",
        dir.display()
    );
    dir
}

#[tokio::test]
async fn the_quickstart_dashboard_shows_live_figures_in_a_browser() {
    let browser = browser_dir();
    let (admin, live) = (crate::free_addr(), crate::free_addr());
    let quickstart = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/quickstart.yaml");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_conflux"))
        .args(["run", quickstart])
        .env("CONFLUX_LOG", "warn")
        .env("CONFLUX_ADMIN", admin.to_string())
        .env("CONFLUX_LIVE", live.to_string())
        .env("QUICKSTART_EVENTS", "1000000")
        .env("QUICKSTART_RATE", "100/s")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _run = crate::Conflux(child);
    crate::wait_ready(admin, 200, Duration::from_secs(20)).await;

    // What the page is told names components and the feed's port, never an option's value.
    let (status, overview) = crate::http_get(admin, "/api/overview").await;
    assert_eq!(status, 200);
    let overview: serde_json::Value = serde_json::from_str(&overview).unwrap();
    assert_eq!(overview["pipelines"][0]["dashboard"]["port"], live.port());
    let text = overview.to_string();
    assert!(!text.contains("hash(") && !text.contains("allow_origins") && !text.contains("50/s"), "{text}");
    let (status, page) = crate::http_get(admin, "/").await;
    assert_eq!(status, 200);
    assert!(page.len() < 200 * 1024, "the page is {} bytes", page.len());
    // Only XML namespace names and the feed (on the page's own host) look like addresses.
    let allowed = page.matches("http://www.w3.org/").count() + page.matches("}://${location.hostname}:").count();
    assert_eq!(page.matches("://").count(), allowed, "the page names another address");
    assert!(!page.contains(" src=") && !page.contains("stylesheet"), "no script or style is loaded");

    let screenshot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/browser/dashboard.mjs");
    let shot = screenshot.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg(script)
            .arg(format!("http://{admin}/"))
            .arg(&shot)
            .env("PLAYWRIGHT_DIR", &browser)
            .output()
    })
    .await
    .unwrap()
    .expect("node must be installed for the dashboard test");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "the browser run failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(seen["changed"], true, "{seen}");
    let bars: Vec<&str> = seen["after"]["bars"].as_array().unwrap().iter().map(|b| b.as_str().unwrap()).collect();
    for restaurant in ["r-0", "r-1", "r-2"] {
        assert!(bars.iter().any(|b| b.starts_with(restaurant)), "{restaurant} has a bar: {bars:?}");
    }
    assert_eq!(seen["after"]["components"].as_array().unwrap().len(), 5, "every component has a row");
    // The tap of `private` shows events after its script: user ids hashed, never the raw `u-…` ones.
    let tap = seen["after"]["tap"].as_str().unwrap();
    assert!(tap.contains("\"userId\"") && !tap.contains("\"u-"), "{tap}");
    assert!(std::fs::metadata(&screenshot).unwrap().len() > 10_000, "a screenshot at {}", screenshot.display());
    eprintln!("dashboard screenshot: {}", screenshot.display());
}
