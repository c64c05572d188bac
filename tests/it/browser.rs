//! The console in a real browser: headless Chromium driven through chromedriver (WebDriver) by
//! fantoccini. Opens the overview, filters the deliveries to the dead letters, replays one
//! through the confirmation and watches its status change; takes a screenshot of every page.
//!
//! The screenshots go into the test's temporary directory, so that `cargo test` leaves the
//! checkout as it was. `LABELHOOK_UPDATE_SCREENSHOTS=1` (see the README's Console section)
//! writes them to `docs/console/` instead: the README's pictures, of real data from that run.

use std::net::TcpListener;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::FutureExt;
use serde_json::json;

use crate::console::{label, seeded, send, LABEL_A};
use crate::helpers::*;

/// How long chromedriver may take to answer `/status` as ready.
const DRIVER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the replayed delivery may take to show as delivered.
const STATUS_TIMEOUT: Duration = Duration::from_secs(30);
/// The browser window: wide enough for the tables, tall enough for most of each page.
const WINDOW: (u32, u32) = (1280, 1100);

/// The path of `program` on `PATH`, if it is there.
fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

/// chromedriver; killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start(chromedriver: &Path, log: &Path) -> Driver {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let driver = Driver { child, url };
        // Ready when its /status says so (bounded polling, no fixed sleep).
        let deadline = Instant::now() + DRIVER_READY_TIMEOUT;
        loop {
            let status = curl(&format!("{}/status", driver.url), &["--max-time", "2"]);
            if status.status == 200 && status.body.replace(' ', "").contains("\"ready\":true") {
                return driver;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not become ready: {status:?}; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::park_timeout(Duration::from_millis(100));
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Only the process this test started, by its handle; the browser is gone already: the
        // session is always closed before the driver is dropped (see `drive`'s caller).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Set to `1` to refresh the README's pictures in `docs/console/`.
const UPDATE_SCREENSHOTS: &str = "LABELHOOK_UPDATE_SCREENSHOTS";

/// Where the screenshots go: `docs/console/` in the repository when [`UPDATE_SCREENSHOTS`] asks
/// for it, else `screenshots/` in the test's own directory (a test run changes no tracked file).
fn screenshots_dir(test_dir: &Path) -> PathBuf {
    let dir = if std::env::var(UPDATE_SCREENSHOTS).is_ok_and(|v| v == "1") {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/console")
    } else {
        test_dir.join("screenshots")
    };
    std::fs::create_dir_all(&dir).expect("create the screenshots' directory");
    dir
}

async fn screenshot(client: &Client, dir: &Path, name: &str) {
    let png = client.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
    std::fs::write(dir.join(format!("{name}.png")), png).expect("write png");
}

/// The text of the page's `<h1>`.
async fn heading(client: &Client) -> String {
    client
        .find(Locator::Css("h1"))
        .await
        .expect("h1")
        .text()
        .await
        .expect("text")
}

/// Waits (bounded) until the page's `<h1>` is `expected`: a click that submits a form returns
/// before the next page may have loaded.
async fn wait_for_heading(client: &Client, expected: &str) {
    let deadline = Instant::now() + STATUS_TIMEOUT;
    loop {
        let now = client
            .find(Locator::Css("h1"))
            .await
            .ok()
            .map(|h1| async move { h1.text().await.unwrap_or_default() });
        let now = match now {
            Some(text) => text.await,
            None => String::new(),
        };
        if now == expected {
            return;
        }
        if Instant::now() >= deadline {
            let page = client.source().await.unwrap_or_default();
            panic!("the page stayed {now:?}, expected {expected:?}:\n{page}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn the_console_in_a_browser_replays_a_dead_letter() {
    let (Some(chromium), Some(chromedriver)) = (on_path("chromium"), on_path("chromedriver"))
    else {
        let why = "chromium or chromedriver is not installed (Debian: chromium chromium-driver)";
        assert!(
            std::env::var_os("LABELHOOK_REQUIRE_SERVICES").is_none(),
            "LABELHOOK_REQUIRE_SERVICES is set, but {why}"
        );
        eprintln!("skipping the browser test: {why}");
        return;
    };
    let s = seeded("");
    // A little more history for the pictures: a third version of the entity.
    let (answer, _) = send(
        &s.server,
        "c-newest",
        &label(LABEL_A, "2026-11-20T12:00:00Z", 0),
        &[],
    );
    assert_eq!(answer.status, 202, "{answer:?}");
    s.server.wait_for_status("c-newest", "dead");
    let driver = Driver::start(&chromedriver, &s.server.dir.path().join("chromedriver.log"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".to_owned(),
            json!({
                "binary": chromium.display().to_string(),
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    format!("--window-size={},{}", WINDOW.0, WINDOW.1),
                ],
            }),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&driver.url)
            .await
            .expect("a WebDriver session");
        // The session is closed (the browser quits) whether the walk passes or panics.
        let walk = AssertUnwindSafe(drive(&client, &s)).catch_unwind().await;
        let _ = client.close().await;
        if let Err(panic) = walk {
            std::panic::resume_unwind(panic);
        }
    });
    drop(driver);
}

/// The walk through the console; the session is closed by the caller whatever happens.
async fn drive(client: &Client, s: &crate::console::Seeded) {
    let shots = screenshots_dir(s.server.dir.path());
    client
        .set_window_size(WINDOW.0, WINDOW.1)
        .await
        .expect("window size");
    client.goto(&s.admin("/ui/")).await.expect("open overview");
    wait_for_heading(client, "Overview").await;
    let dead_card = client
        .find(Locator::Css(r#".card p.big a[href="/ui/dead"]"#))
        .await
        .expect("the dead letters card")
        .text()
        .await
        .expect("text");
    assert_eq!(dead_card, "6", "six dead letters kept");
    screenshot(client, &shots, "overview").await;

    // The deliveries, filtered to the dead letters with the page's own form.
    client
        .find(Locator::LinkText("Deliveries"))
        .await
        .expect("nav")
        .click()
        .await
        .expect("click");
    wait_for_heading(client, "Deliveries").await;
    screenshot(client, &shots, "deliveries").await;
    client
        .find(Locator::Css(r#"select[name="status"]"#))
        .await
        .expect("status filter")
        .select_by_value("dead")
        .await
        .expect("choose dead");
    client
        .find(Locator::Css(r#"form.filters button[type="submit"]"#))
        .await
        .expect("filter button")
        .click()
        .await
        .expect("filter");
    let deadline = Instant::now() + STATUS_TIMEOUT;
    loop {
        let url = client.current_url().await.expect("url");
        if url.as_str().contains("status=dead") {
            break;
        }
        assert!(Instant::now() < deadline, "the filter did not apply: {url}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let statuses = client
        .find_all(Locator::Css(r#"table.deliveries .badge[class*="status-"]"#))
        .await
        .expect("rows");
    let mut words = Vec::new();
    for badge in &statuses {
        words.push(badge.text().await.expect("text"));
    }
    assert_eq!(words.len(), 6, "{words:?}");
    assert!(words.iter().all(|w| w == "dead"), "{words:?}");

    // The dead letters: select the newest version and review what replay will do.
    client
        .find(Locator::LinkText("Dead letters"))
        .await
        .expect("nav")
        .click()
        .await
        .expect("click");
    wait_for_heading(client, "Dead letters").await;
    screenshot(client, &shots, "dead-letters").await;
    // Select the newest version (queued again) and an older one (superseded), to show both.
    for id in ["c-newest", "c-old"] {
        client
            .find(Locator::Css(&format!(
                r#"input[type="checkbox"][value="{id}"]"#
            )))
            .await
            .expect("its checkbox")
            .click()
            .await
            .expect("select");
    }
    client
        .find(Locator::Css(r#"button[form="replay"]"#))
        .await
        .expect("review button")
        .click()
        .await
        .expect("review");
    wait_for_heading(client, "Replay: what it will do").await;
    let page = client.source().await.expect("source");
    assert!(
        page.contains("queued again: gated again, then flaky"),
        "{page}"
    );
    assert!(page.contains("comes back stale and is withheld"), "{page}");
    screenshot(client, &shots, "replay-confirmation").await;
    assert_eq!(s.server.status_of("c-newest").as_deref(), Some("dead"));

    // The handler works again; replay.
    s.heal();
    client
        .find(Locator::Css(r#"form[action="/ui/replay"] button"#))
        .await
        .expect("replay button")
        .click()
        .await
        .expect("replay");
    wait_for_heading(client, "Replay: done").await;

    // The delivery's page shows it delivered (reloaded until it does, bounded).
    client
        .find(Locator::LinkText("c-newest"))
        .await
        .expect("link to the delivery")
        .click()
        .await
        .expect("open the delivery");
    let deadline = Instant::now() + STATUS_TIMEOUT;
    loop {
        let status = client
            .find(Locator::Css("article.delivery h2 .badge"))
            .await
            .expect("status badge")
            .text()
            .await
            .expect("text");
        if status == "delivered" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "c-newest stayed {status}; logs:\n{}",
            s.server.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.refresh().await.expect("reload");
    }
    screenshot(client, &shots, "delivery").await;

    // Its entity: every version in order, the replayed older one now stale.
    client
        .find(Locator::Css(r#"dd a[href^="/ui/entity"]"#))
        .await
        .expect("entity link")
        .click()
        .await
        .expect("open the entity");
    let deadline = Instant::now() + STATUS_TIMEOUT;
    loop {
        let page = client.source().await.expect("source");
        if page.contains("<td>stale</td>") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "c-old never showed stale: {page}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.refresh().await.expect("reload");
    }
    assert!(heading(client).await.starts_with("Entity label:"));
    screenshot(client, &shots, "entity").await;
}
