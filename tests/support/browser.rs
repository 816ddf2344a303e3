//! A headless Chromium (Debian's package) driven over the DevTools
//! protocol: load a page, read its live DOM, click and type as a user
//! would (real mouse and keyboard events), take a screenshot.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::process::{Proc, TempDir};
use super::*;

/// True when Chromium is installed; else the test is skipped, or fails
/// under `SLUICE_REQUIRE_CHROMIUM` (`.ci/run` sets it).
pub fn chromium_here() -> bool {
    let installed = std::process::Command::new("sh")
        .args(["-c", "command -v chromium"])
        .output()
        .is_ok_and(|o| o.status.success());
    tool_present(
        installed,
        "SLUICE_REQUIRE_CHROMIUM",
        "needs Debian's chromium package",
    )
}

/// Headless Chromium with a profile of its own in `profile`, its output
/// discarded; the caller adds its flags and the URL.
pub fn chromium(profile: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new("chromium");
    cmd.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    cmd
}

/// One Chromium with one page, until dropped.
pub struct Browser {
    _proc: Proc,
    _profile: TempDir,
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Browser {
    /// Starts Chromium showing `url` in a 1280×900 window.
    pub async fn open(url: &str) -> Self {
        let profile = TempDir::new("chromium-profile").expect("profile dir");
        let proc = Proc(
            chromium(profile.path())
                .args([
                    "--window-size=1280,900",
                    "--remote-debugging-port=0",
                    "--remote-allow-origins=*",
                ])
                .arg(url)
                .spawn()
                .expect("chromium starts"),
        );
        // Chromium writes the port it chose into the profile.
        let port_file = profile.path().join("DevToolsActivePort");
        let port: u16 = within(30, "chromium's DevTools port", async {
            loop {
                if let Some(port) = std::fs::read_to_string(&port_file)
                    .ok()
                    .and_then(|t| t.lines().next()?.parse().ok())
                {
                    return port;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let page = within(30, "the page target", async {
            loop {
                let host = format!("127.0.0.1:{port}");
                let mut http = HttpClient::connect(host.parse().expect("addr")).await;
                // DevTools answers only a Host that is an address.
                let req = hyper::Request::get("/json/list")
                    .header("host", &host)
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .expect("request");
                let list: Value =
                    serde_json::from_slice(&http.send(req).await.body).unwrap_or_default();
                let found = list.as_array().and_then(|targets| {
                    targets
                        .iter()
                        .find(|t| t["type"] == "page")
                        .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_string))
                });
                if let Some(found) = found {
                    return found;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        let (ws, _) = tokio_tungstenite::connect_async(page.as_str())
            .await
            .expect("DevTools connection");
        Self {
            _proc: proc,
            _profile: profile,
            ws,
            next_id: 1,
        }
    }

    /// Calls a DevTools method; its result.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({ "id": id, "method": method, "params": params });
        self.ws
            .send(Message::text(request.to_string()))
            .await
            .expect("DevTools send");
        within(30, method, async {
            while let Some(msg) = self.ws.next().await {
                let Ok(Message::Text(text)) = msg else {
                    continue;
                };
                let reply: Value = serde_json::from_str(&text).expect("DevTools JSON");
                if reply["id"] == id {
                    assert!(reply.get("error").is_none(), "{method}: {reply}");
                    return reply["result"].clone();
                }
            }
            panic!("DevTools connection closed");
        })
        .await
    }

    /// The value of JavaScript `expr` in the page (awaited if a promise).
    pub async fn eval(&mut self, expr: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        assert!(result.get("exceptionDetails").is_none(), "{expr}: {result}");
        result["result"]["value"].clone()
    }

    /// Polls `expr` until it is true (an exception, e.g. before the page
    /// has loaded, counts as false).
    pub async fn wait_for(&mut self, secs: u64, what: &str, expr: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        let guarded = format!(
            "(() => {{ try {{ return ({expr}) === true; }} catch (_) {{ return false; }} }})()"
        );
        loop {
            if self.eval(&guarded).await == Value::Bool(true) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {secs}s: {what} ({expr})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the middle of the element `selector` with the mouse.
    pub async fn click(&mut self, selector: &str) {
        let at = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({sel}); if (!e) return null; \
                 e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
                 return [r.x + r.width / 2, r.y + r.height / 2]; }})()",
                sel = serde_json::to_string(selector).expect("selector")
            ))
            .await;
        let (x, y) = (at[0].as_f64(), at[1].as_f64());
        let (Some(x), Some(y)) = (x, y) else {
            panic!("no element {selector} to click");
        };
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            )
            .await;
        }
    }

    /// Types `text` into the focused element, as a keyboard would.
    pub async fn type_text(&mut self, text: &str) {
        self.call("Input.insertText", json!({ "text": text })).await;
    }

    /// Saves a PNG of the page to `path`.
    pub async fn screenshot(&mut self, path: &Path) {
        let shot = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        let data = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("artifact dir");
        }
        std::fs::write(path, data).expect("screenshot written");
    }
}
