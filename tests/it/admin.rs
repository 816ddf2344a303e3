//! The admin API and metrics.

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{Value, json};
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
    let v: Value = serde_json::from_slice(&reply.body).expect("JSON error body");
    v["error"].as_str().expect("error message").to_string()
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
    match bad.get("/api/v1/status").await {
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
    let (_ws, name) = sluice.ws_named("/ws").await;
    let status = sluice.admin().get("/api/v1/status").await.expect("status");
    let pool = &status["pools"][0];
    assert_eq!(pool["name"], "app");
    assert_eq!(pool["algorithm"], "least_conn");
    assert_eq!(pool["connections"], 1);
    let b = pool["backends"].as_array().expect("backends");
    assert_eq!(b.len(), 2);
    let busy = b
        .iter()
        .find(|x| x["name"] == name.as_str())
        .expect("the busy one");
    assert_eq!(busy["connections"], json!({ "ws": 1, "http": 0 }));
    assert_eq!(busy["state"], "up");
    assert_eq!(
        busy["address"],
        backends
            .iter()
            .find(|x| x.name == name)
            .expect("backend")
            .addr
            .to_string()
    );
    assert!(busy["drain"].is_null());
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
    // Nothing was drained by the bad requests.
    assert_eq!(sluice.registry().pool(0).backends[0].state().as_str(), "up");
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
        "sluice_upstream_connect_seconds_count 2",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(text.contains("sluice_bytes_total{pool=\"app\",backend=\"b1\",direction=\"up\"}"));
}
