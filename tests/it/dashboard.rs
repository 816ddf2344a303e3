//! The dashboard, as a user sees it in a real browser: headless Chromium
//! reads the live page while clients connect and while a backend is
//! drained through the page's own buttons.

use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::support::browser::{Browser, chromium_here};
use crate::support::*;

/// The sum of the WebSocket counts in the page's backend table.
const WS_IN_TABLE: &str = "[...document.querySelectorAll('td[data-field=\"ws\"]')].reduce((n, e) => n + Number(e.textContent), 0)";

fn chart(field: &str) -> String {
    format!("document.querySelector('canvas[data-chart=\"ws\"]').dataset.{field}")
}

#[tokio::test]
async fn the_dashboard_shows_live_counts_and_drains_through_its_own_button() {
    if !chromium_here() {
        return;
    }
    let _heavy = heavy().await;
    let backends = echo_backends(3).await;
    let mut cfg = config(&backends.iter().map(|b| b.addr).collect::<Vec<_>>());
    cfg.pools[0].drain.window = Duration::from_secs(2);
    cfg.pools[0].rebalance.enabled = false;
    let sluice = Sluice::with_config(cfg).await;
    let stop = CancellationToken::new();
    let mut clients = chatters(&sluice, 30, Duration::from_millis(300), &stop);
    eventually(20, "30 clients", || {
        backends.iter().map(|b| b.ws_open()).sum::<usize>() == 30
    })
    .await;

    let mut page = Browser::open(&format!("http://{}/", sluice.admin_addr())).await;
    // No token yet: the page asks for it and shows nothing else.
    page.wait_for(
        20,
        "the token form",
        "!document.getElementById('login').hidden",
    )
    .await;
    assert_eq!(
        page.eval("document.getElementById('pools').children.length")
            .await,
        0
    );
    page.click("#token").await;
    page.type_text(ADMIN_TOKEN).await;
    page.click("#login button[type=submit]").await;
    page.wait_for(
        20,
        "30 WebSockets in the table",
        &format!("{WS_IN_TABLE} === 30"),
    )
    .await;
    page.wait_for(
        10,
        "the chart has samples",
        &format!("Number({}) >= 2", chart("samples")),
    )
    .await;
    let samples_before: u64 = page
        .eval(&chart("samples"))
        .await
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("samples");

    // More clients: the counts and the chart follow.
    clients.extend(chatters(&sluice, 15, Duration::from_millis(300), &stop));
    page.wait_for(
        20,
        "45 WebSockets in the table",
        &format!("{WS_IN_TABLE} === 45"),
    )
    .await;
    let last_sum = format!(
        "Object.values(JSON.parse({})).reduce((a, b) => a + b, 0)",
        chart("last")
    );
    page.wait_for(
        10,
        "the chart's last point says 45",
        &format!("{last_sum} === 45"),
    )
    .await;
    let samples_after: u64 = page
        .eval(&chart("samples"))
        .await
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("samples");
    assert!(
        samples_after > samples_before,
        "{samples_before} -> {samples_after}"
    );

    // Drain b1 with the page's button, confirmed on the page.
    let on_b1 = backends[0].ws_open();
    assert!(on_b1 > 0);
    page.click("button[data-action=drain][data-backend='app/b1']")
        .await;
    page.wait_for(
        5,
        "the confirmation",
        "!!document.querySelector(\"button[data-confirm='app/b1']\")",
    )
    .await;
    assert!(
        backends[0].ws_open() > 0,
        "nothing happens before the confirmation"
    );
    page.click("button[data-confirm='app/b1']").await;
    eventually(20, "b1 drained by the page", || backends[0].ws_open() == 0).await;
    let b1_state =
        "document.querySelector(\"tr[data-backend='app/b1'] [data-field=state]\").textContent";
    page.wait_for(
        10,
        "b1 shows drained",
        &format!("{b1_state}.startsWith('drained')"),
    )
    .await;
    page.wait_for(10, "b1 at 0 in the table", "document.querySelector(\"tr[data-backend='app/b1'] td[data-field=ws]\").textContent === '0'")
        .await;
    page.wait_for(
        10,
        "b1 at 0 in the chart",
        &format!("JSON.parse({}).b1 === 0", chart("last")),
    )
    .await;
    page.wait_for(
        10,
        "its clients are back on b2 and b3",
        &format!("{WS_IN_TABLE} === 45"),
    )
    .await;
    let drained = page
        .eval("document.querySelector('[data-field=drained]').textContent")
        .await;
    assert!(
        drained
            .as_str()
            .is_some_and(|t| t.contains(&format!("{on_b1} in"))),
        "{drained}"
    );
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    page.screenshot(&shot).await;
    eprintln!("dashboard screenshot: {}", shot.display());

    // And back, the same way.
    page.click("button[data-action=undrain][data-backend='app/b1']")
        .await;
    page.click("button[data-confirm='app/b1']").await;
    page.wait_for(10, "b1 back up", &format!("{b1_state} === 'up'"))
        .await;
    assert_eq!(
        sluice.backend_status("b1").await.state,
        sluice::admin::api::BackendState::Up
    );
    let (_, totals) = finish_chat(&stop, clients).await;
    assert_eq!((totals.lost, totals.wrong), (0, 0), "{totals:?}");

    // A second load, with a wrong token: a clear message and no data.
    drop(page);
    let mut wrong = Browser::open(&format!(
        "http://{}/#token=not-the-token",
        sluice.admin_addr()
    ))
    .await;
    wrong
        .wait_for(
            20,
            "the wrong-token message",
            "document.getElementById('login-error').textContent.startsWith('Wrong token')",
        )
        .await;
    assert_eq!(
        wrong
            .eval("document.getElementById('pools').children.length")
            .await,
        0
    );
    assert_eq!(
        wrong.eval("location.hash").await,
        Value::String(String::new()),
        "the token left the address bar"
    );
}

#[tokio::test]
async fn the_page_needs_no_token_its_data_does_and_other_origins_cannot_drain() {
    let backends = echo_backends(1).await;
    let sluice = Sluice::start(&[&backends[0]]).await;
    let admin = sluice.admin_addr();
    let page = curl(&["-i", &format!("http://{admin}/")]).await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("frame-ancestors 'none'"), "{page}");
    for asset in ["dashboard.js", "dashboard.css"] {
        curl(&["-f", "-o", "/dev/null", &format!("http://{admin}/{asset}")]).await;
    }
    let code = |args: &[&str]| {
        let mut all = vec!["-o", "/dev/null", "-w", "%{http_code}"];
        all.extend_from_slice(args);
        all.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| async move {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&refs).await
    };
    let timeline = format!("http://{admin}/api/v1/timeline");
    assert_eq!(run(code(&[&timeline])).await, "401");
    let bearer = format!("Authorization: Bearer {ADMIN_TOKEN}");
    let body = curl(&["-H", &bearer, &format!("{timeline}?since=0")]).await;
    let doc: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(doc["interval_ms"], 1000);
    assert_eq!(
        run(code(&["-H", &bearer, &format!("{timeline}?since=x")])).await,
        "400"
    );
    // A page of another origin cannot drain, even with the token.
    let drain = format!("http://{admin}/api/v1/pools/app/backends/b1/drain");
    let evil = run(code(&[
        "-X",
        "POST",
        "-H",
        &bearer,
        "-H",
        "Origin: http://evil.example",
        &drain,
    ]))
    .await;
    assert_eq!(evil, "403");
    assert_eq!(
        sluice.backend_status("b1").await.state,
        sluice::admin::api::BackendState::Up
    );
    let own = format!("Origin: http://{admin}");
    assert_eq!(
        run(code(&["-X", "POST", "-H", &bearer, "-H", &own, &drain])).await,
        "200"
    );
}
