//! Driving the real app in headless Chromium over WebDriver (chromedriver + fantoccini),
//! and running `postern app` processes for it.
//!
//! Chromium and chromedriver come from Debian's `chromium` and `chromium-driver`
//! packages; when they are missing the harness installs them if it runs as root (and says
//! so), and otherwise fails with the command to run — a browser test that silently skips
//! would pass without testing anything.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};

use super::common::{ReadyProcess, BIN};

/// How long a page may take to show what a test waits for (route races included).
pub const UI_TIMEOUT: Duration = Duration::from_secs(30);

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Makes sure Chromium and chromedriver are installed.
fn ensure_browser() {
    postern_test_kit::apt::ensure(
        &[CHROMIUM, CHROMEDRIVER],
        &["chromium", "chromium-driver"],
        "the app's browser tests",
    );
}

/// One chromedriver with one headless Chromium session, each with its own empty profile.
pub struct Browser {
    pub client: Client,
    driver: ReadyProcess,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub async fn start() -> Browser {
        ensure_browser();
        // chromedriver has no "any free port" option: take one from the kernel.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut cmd = Command::new(CHROMEDRIVER);
        cmd.arg(format!("--port={port}"));
        let driver = ReadyProcess::try_start(cmd, |l| {
            l.contains("started successfully").then(String::new)
        })
        .unwrap_or_else(|(e, stderr)| panic!("chromedriver: {e}\n{}", stderr.join("\n")));
        let profile = tempfile::tempdir().expect("browser profile");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1200,780",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("WebDriver session with chromium");
        Browser {
            client,
            driver,
            _profile: profile,
        }
    }

    /// The first element matching `css`, once there is one.
    pub async fn find(&self, css: &str) -> Element {
        self.client
            .wait()
            .at_most(UI_TIMEOUT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css} within {UI_TIMEOUT:?}: {e}"))
    }

    /// Waits until the text of the first element matching `css` satisfies `ok`; returns it.
    pub async fn text_until(&self, css: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + UI_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok(el) = self.client.find(Locator::Css(css)).await {
                if let Ok(t) = el.text().await {
                    if ok(&t) {
                        return t;
                    }
                    last = t;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{css} never showed the expected text; last: {last:?}")
    }

    /// Waits until an element matching `css` exists (e.g. `[data-status=delivered]`).
    pub async fn until_exists(&self, css: &str) -> Element {
        self.find(css).await
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css).await;
        el.clear().await.ok();
        el.send_keys(text).await.expect("type");
    }

    /// Clicks the first element matching `css`, found afresh if the page re-rendered it
    /// between finding and clicking (a live update can replace it at any moment).
    pub async fn click(&self, css: &str) {
        let deadline = Instant::now() + UI_TIMEOUT;
        loop {
            match self.find(css).await.click().await {
                Ok(_) => return,
                Err(fantoccini::error::CmdError::Standard(e))
                    if e.error == fantoccini::error::ErrorStatus::StaleElementReference
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("click {css}: {e}"),
            }
        }
    }

    /// Saves a screenshot as `NAME.png` in `$POSTERN_APP_SCREENSHOTS`, if set (the README's
    /// pictures come from here: `POSTERN_APP_SCREENSHOTS=docs/app cargo test --test app`).
    pub async fn screenshot(&self, name: &str) {
        let Some(dir) = std::env::var_os("POSTERN_APP_SCREENSHOTS") else {
            return;
        };
        let dir = PathBuf::from(dir);
        let dir = if dir.is_relative() {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../..")
                .join(dir)
        } else {
            dir
        };
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        let png = self.client.screenshot().await.expect("screenshot");
        std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
    }

    pub async fn close(self) {
        let Browser { client, driver, .. } = self;
        let _ = client.close().await;
        driver.kill();
    }
}

/// A `postern app --no-browser` process for one profile (killed when dropped).
pub struct AppProcess {
    _process: ReadyProcess,
    /// The address it printed, with this run's token.
    pub url: String,
}

impl AppProcess {
    pub fn start(home: &Path) -> AppProcess {
        let mut cmd = Command::new(BIN);
        cmd.arg("--home")
            .arg(home)
            .args(["app", "--no-browser", "--listen", "127.0.0.1:0"])
            .env_remove("POSTERN_HOME");
        let process = ReadyProcess::start(cmd, "postern app ready: ");
        AppProcess {
            url: process.ready.clone(),
            _process: process,
        }
    }
}
