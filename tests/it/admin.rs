//! The admin API and metrics.

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::Full;
use sluice::admin::api::{self, BackendState};
use sluice::admin::client::{AdminClient, ClientError};

use crate::support::*;

async fn raw(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> HttpReply {
    let mut client = HttpClient::connect(addr).await;
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "admin");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    client
        .send(
            req.body(Full::new(Bytes::from(body.to_string())))
                .expect("request"),
        )
        .await
}

fn error_of(reply: &HttpReply) -> String {
    let body: api::ErrorBody = serde_json::from_slice(&reply.body).expect("JSON error body");
    body.error
}

#[tokio::test]
async fn api_needs_the_token() {
    let backends = echo_backends(1).await;
    let sluice = Sluice::start(&[&backends[0]]).await;
    for token in [None, Some("wrong"), Some("test-token-but-longer")] {
        let reply = raw(sluice.admin_addr(), "GET", "/api/v1/status", token, "").await;
        assert_eq!(reply.status, 401);
        assert_eq!(reply.headers["www-authenticate"], "Bearer");
        assert!(error_of(&reply).contains("token"));
    }
    let bad = AdminClient {
        addr: sluice.admin_addr(),
        token: None,
    };
    match bad.status().await {
        Err(ClientError::Status { status, .. }) => assert_eq!(status, 401),
        other => panic!("expected 401, got {other:?}"),
    }
    let reply = raw(
        sluice.admin_addr(),
        "GET",
        "/api/v1/status",
        Some(ADMIN_TOKEN),
        "",
    )
    .await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn status_shows_pools_backends_states_and_counts() {
    let backends = echo_backends(2).await;
    let sluice = Sluice::start(&[&backends[0], &backends[1]]).await;
    let (ws, name) = sluice.ws_named("/ws").await;
    let admin = sluice.admin();
    let status = sluice.status().await;
    let pool = &status.pools[0];
    assert_eq!(pool.name, "app");
    assert_eq!(pool.algorithm, "least_conn");
    assert_eq!(pool.connections, 1);
    assert_eq!(pool.backends.len(), 2);
    let busy = status.backend("app", &name).expect("the busy one");
    assert_eq!(busy.connections, api::Connections { ws: 1, http: 0 });
    assert_eq!(busy.state, BackendState::Up);
    assert_eq!(
        busy.address,
        backends
            .iter()
            .find(|x| x.name == name)
            .expect("backend")
            .addr
            .to_string()
    );
    assert!(busy.drain.is_none());
    let rebalance = pool.rebalance.as_ref().expect("rebalance settings");
    assert_eq!(rebalance.interval_ms, 15_000);

    // The state and the drain progress follow a drain of the busy backend:
    // draining while its WebSocket is open, drained once it closed (the
    // client answers the Close), up again after undrain.
    let client = tokio::spawn(async move {
        let mut ws = ws;
        while let Some(Ok(_)) = ws.next().await {}
    });
    let draining = admin.drain("app", &name, Some("1s")).await.expect("drain");
    assert_eq!(draining.state, BackendState::Draining);
    assert_eq!(draining.drain.map(|d| d.window_ms), Some(1000));
    let drained = sluice
        .wait_backend_state(15, &name, BackendState::Drained)
        .await;
    within(10, "client closed", client)
        .await
        .expect("client task");
    assert_eq!(drained.connections.total(), 0);
    let progress = drained.drain.expect("progress is kept while drained");
    assert_eq!((progress.planned, progress.closed), (1, 1));
    let status = sluice.status().await;
    let idle = status
        .backends()
        .find(|b| b.name != name)
        .expect("the other backend");
    assert_eq!(idle.state, BackendState::Up, "only the drained one changed");
    let back = admin.undrain("app", &name).await.expect("undrain");
    assert_eq!((back.state, back.drain), (BackendState::Up, None));
}

#[tokio::test]
async fn unknown_targets_and_bad_input_are_explained() {
    let backends = echo_backends(1).await;
    let sluice = Sluice::start(&[&backends[0]]).await;
    let addr = sluice.admin_addr();
    let t = Some(ADMIN_TOKEN);
    let cases = [
        (
            "POST",
            "/api/v1/pools/nope/backends/b1/drain",
            "",
            404,
            "no pool named \"nope\"",
        ),
        (
            "POST",
            "/api/v1/pools/app/backends/zz/drain",
            "",
            404,
            "pool \"app\" has no backend named \"zz\"",
        ),
        (
            "POST",
            "/api/v1/pools/app/backends/b1/drain",
            "{\"window\": \"soon\"}",
            400,
            "window \"soon\"",
        ),
        (
            "POST",
            "/api/v1/pools/app/backends/b1/drain",
            "{\"window\": 5}",
            400,
            "window must be a string",
        ),
        (
            "POST",
            "/api/v1/pools/app/backends/b1/drain",
            "{\"windw\": \"5s\"}",
            400,
            "unknown field \"windw\"",
        ),
        (
            "POST",
            "/api/v1/pools/app/backends/b1/drain",
            "{\"windw\": \"5m\"}",
            400,
            "unknown field \"windw\", expected \"window\"",
        ),
        (
            "POST",
            "/api/v1/pools/app/backends/b1/drain",
            "{\"window\": \"5m\", \"wait\": true}",
            400,
            "unknown field \"wait\"",
        ),
        (
            "POST",
            "/api/v1/pools/app/backends/b1/drain",
            "{\"window\": null}",
            400,
            "window must be a string",
        ),
        (
            "POST",
            "/api/v1/pools/app/backends/b1/drain",
            "{\"window\": \"31days\"}",
            400,
            "window \"31days\" is longer than 30 days",
        ),
        (
            "POST",
            "/api/v1/pools/app/backends/b1/undrain",
            "{\"window\": \"5m\"}",
            400,
            "unknown field \"window\"",
        ),
        (
            "POST",
            "/api/v1/pools/app/backends/b1/drain",
            "{oops",
            400,
            "not valid JSON",
        ),
        (
            "POST",
            "/api/v1/pools/app/backends/b1/drain",
            "[1]",
            400,
            "JSON object",
        ),
        (
            "GET",
            "/api/v1/pools/app/backends/b1/drain",
            "",
            405,
            "wrong method",
        ),
        ("DELETE", "/api/v1/status", "", 405, "wrong method"),
        ("GET", "/api/v2/whatever", "", 404, "no such endpoint"),
    ];
    for (method, path, body, status, message) in cases {
        let reply = raw(addr, method, path, t, body).await;
        assert_eq!(reply.status, status, "{method} {path} {body}");
        assert!(
            error_of(&reply).contains(message),
            "{method} {path}: {}",
            error_of(&reply)
        );
    }
    // Nothing was drained by the bad requests; the same request with an
    // empty body (no fields) drains.
    assert_eq!(sluice.backend_status("b1").await.state, BackendState::Up);
    let reply = raw(addr, "POST", "/api/v1/pools/app/backends/b1/drain", t, "").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let answer: api::Backend = serde_json::from_slice(&reply.body).expect("backend JSON");
    assert_eq!(answer.state, BackendState::Draining);
    assert_eq!(
        answer.drain.map(|d| d.window_ms),
        Some(120_000),
        "the pool's default window"
    );
    sluice
        .wait_backend_state(5, "b1", BackendState::Drained)
        .await;
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_the_documented_names() {
    let backends = echo_backends(1).await;
    let sluice = Sluice::start(&[&backends[0]]).await;
    let (mut ws, _) = sluice.ws_named("/ws").await;
    echo(&mut ws, tokio_tungstenite::tungstenite::Message::text("hi")).await;
    let mut http = sluice.http().await;
    assert_eq!(http.get("/x").await.status, 200);
    let reply = raw(sluice.admin_addr(), "GET", "/metrics", None, "").await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.headers["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/plain; version=0.0.4")
    );
    let text = reply.text();
    for line in [
        "sluice_connections{pool=\"app\",backend=\"b1\",kind=\"ws\"} 1",
        "sluice_connections{pool=\"app\",backend=\"b1\",kind=\"http\"} 0",
        "sluice_connections_accepted_total{listener=\"public\"} 2",
        "sluice_ws_messages_total{pool=\"app\",backend=\"b1\",direction=\"up\"} 1",
        "sluice_ws_messages_total{pool=\"app\",backend=\"b1\",direction=\"down\"} 2",
        "sluice_backend_up{pool=\"app\",backend=\"b1\"} 1",
        "sluice_drain_closed_total{pool=\"app\",backend=\"b1\"} 0",
        "sluice_ws_messages_cut_total{pool=\"app\",backend=\"b1\"} 0",
        "sluice_upstream_connect_seconds_count 2",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(text.contains("sluice_bytes_total{pool=\"app\",backend=\"b1\",direction=\"up\"}"));
}

#[tokio::test]
async fn idle_admin_connections_are_closed_and_bounded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backends = echo_backends(1).await;
    let mut cfg = config(&[backends[0].addr]);
    if let Some(admin) = cfg.admin.as_mut() {
        admin.header_read_timeout = std::time::Duration::from_millis(300);
        admin.max_connections = 2;
    }
    let sluice = Sluice::with_config(cfg).await;
    let addr = sluice.admin_addr();
    // Two silent connections take both places...
    let started = std::time::Instant::now();
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    // ...so a third request is answered only once the timeout has closed
    // one of them.
    let mut third = tokio::net::TcpStream::connect(addr).await.expect("connect");
    third
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    within(5, "answer", third.read_to_end(&mut answer))
        .await
        .expect("read");
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(250),
        "answered while both places were taken"
    );
    for mut conn in idle {
        let mut rest = Vec::new();
        let n = within(5, "idle close", conn.read_to_end(&mut rest))
            .await
            .expect("closed");
        assert_eq!(n, 0, "an idle connection is closed without an answer");
    }
}
