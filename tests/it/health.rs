//! Health checks, passive ejection, slow start and storm admission.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::join_all;
use sluice::admin::api::BackendState;
use sluice::config::{AdmissionConfig, HealthConfig, PassiveConfig};

use crate::support::*;

fn state(sluice: &Sluice, b: usize) -> &'static str {
    sluice.registry().pools()[0].backends[b]
        .condition()
        .as_str()
}

#[tokio::test]
async fn failing_health_check_takes_a_backend_out_and_back() {
    let backends = echo_backends(2).await;
    let mut cfg = config(&[backends[0].addr, backends[1].addr]);
    let interval = Duration::from_millis(100);
    cfg.pools[0].health = Some(HealthConfig {
        path: Some("/health".into()),
        interval,
        timeout: Duration::from_millis(500),
        rise: 2,
        fall: 3,
        expect_status: None,
    });
    let sluice = Sluice::with_config(cfg).await;
    // The checks run and pass before anything changes.
    eventually(5, "two checks answered", || {
        backends[0].stats.http_requests.load(Ordering::SeqCst) >= 2
    })
    .await;
    assert_eq!(state(&sluice, 0), "up");

    let failing_since = Instant::now();
    backends[0].set_healthy(false);
    eventually(5, "b1 down", || state(&sluice, 0) == "down").await;
    let down_after = failing_since.elapsed();
    // interval x fall, plus one interval of phase and some slack.
    assert!(
        down_after <= interval * 5 + Duration::from_millis(200),
        "down after {down_after:?}"
    );
    for _ in 0..6 {
        assert_eq!(sluice.http().await.get("/x").await.backend(), "b2");
    }
    let healthy_since = Instant::now();
    backends[0].set_healthy(true);
    eventually(5, "b1 up", || state(&sluice, 0) == "up").await;
    let up_after = healthy_since.elapsed();
    assert!(
        up_after >= interval,
        "came back after {up_after:?}, before rise checks could pass"
    );
    let (_ws, name) = sluice.ws_named("/ws").await;
    assert_eq!(name, "b1", "back in rotation (and emptiest)");
    println!(
        "active check: down {down_after:?} after /health failed, up {up_after:?} after it recovered"
    );
}

#[tokio::test]
async fn killed_backend_is_ejected_passively_before_the_next_check() {
    let backends = echo_backends(2).await;
    let mut cfg = config(&[backends[0].addr, backends[1].addr]);
    cfg.pools[0].health = Some(HealthConfig {
        interval: Duration::from_secs(30), // the next active check is far away
        ..HealthConfig::default()
    });
    cfg.pools[0].passive = PassiveConfig {
        consecutive_failures: 3,
        ejection_time: Duration::from_secs(30),
    };
    let sluice = Sluice::with_config(cfg).await;
    let killed = Instant::now();
    backends[0].kill();
    // Traffic keeps coming; every request still succeeds (retried on b2).
    let mut requests = 0;
    while state(&sluice, 0) != "down" {
        let reply = sluice.http().await.get("/x").await;
        assert_eq!((reply.status, reply.backend().as_str()), (200, "b2"));
        requests += 1;
        assert!(killed.elapsed() < Duration::from_secs(5), "not ejected");
    }
    let ejected_after = killed.elapsed();
    assert!(requests <= 6, "{requests} requests before ejection");
    let status = sluice.status().await;
    assert_eq!(status.pools[0].backends[0].state, BackendState::Down);
    println!("passive ejection {ejected_after:?} after the kill, after {requests} requests");
}

#[tokio::test]
async fn a_returning_backend_ramps_up_instead_of_taking_everything() {
    let backends = echo_backends(2).await;
    let mut cfg = config(&[backends[0].addr, backends[1].addr]);
    cfg.pools[0].slow_start = Duration::from_secs(3);
    let sluice = Sluice::with_config(cfg).await;
    let mut held = Vec::new();
    for _ in 0..200 {
        held.push(sluice.ws_named("/ws").await);
    }
    // b1 leaves (its clients close) and comes back empty.
    let admin = sluice.admin();
    admin.drain("app", "b1", Some("0s")).await.expect("drain");
    for (ws, name) in held.iter_mut() {
        if name == "b1" {
            let _ = within(5, "close", ws.next()).await;
        }
    }
    eventually(10, "b1 drained", || state(&sluice, 0) == "drained").await;
    admin.undrain("app", "b1").await.expect("undrain");
    assert_eq!(state(&sluice, 0), "slow_start");
    // 30 new clients every 300 ms for 3 s. Without slow start the empty
    // backend would take every one of the first ~100.
    let mut to_b1 = Vec::new();
    for _ in 0..10 {
        let batch = join_all((0..30).map(|_| sluice.ws_named("/ws"))).await;
        to_b1.push(batch.iter().filter(|(_, n)| n == "b1").count());
        held.extend(batch);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let first: usize = to_b1[..3].iter().sum();
    let last: usize = to_b1[7..].iter().sum();
    assert!(
        first < last,
        "share of b1 per batch did not grow: {to_b1:?}"
    );
    assert!(
        first <= 45,
        "the returning backend took {first} of the first 90: {to_b1:?}"
    );
    eventually(5, "ramp over", || state(&sluice, 0) == "up").await;
    println!("new connections to b1 per batch of 30 over the 3 s ramp: {to_b1:?}");
}

/// A client that stays connected, and when its connection ends reconnects,
/// waiting as long as a 503's Retry-After says. Returns (503s seen,
/// Retry-After values, reconnected, other errors).
async fn storm_client(url: String, mut ws: Ws) -> (u32, Vec<u64>, bool, Vec<String>) {
    while ws.next().await.is_some() {}
    let mut refused = 0;
    let mut waits = Vec::new();
    let mut errors = Vec::new();
    for _ in 0..60 {
        match tokio_tungstenite::connect_async(url.as_str()).await {
            Ok((mut ws, _)) => {
                if !matches!(ws.next().await, Some(Ok(_))) {
                    // Closed before the greeting: a client just tries again.
                    errors.push("closed before the greeting".to_string());
                    continue;
                }
                // Stay connected until the test ends.
                tokio::spawn(async move { while ws.next().await.is_some() {} });
                return (refused, waits, true, errors);
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) if resp.status() == 503 => {
                refused += 1;
                let secs: u64 = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .expect("503 carries Retry-After");
                waits.push(secs);
                tokio::time::sleep(Duration::from_secs(secs)).await;
            }
            Err(error) => {
                errors.push(error.to_string());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    (refused, waits, false, errors)
}

/// 1,000 clients on 3 backends; one backend dies; returns the new
/// WebSockets per 100 ms on the survivors, and the clients' outcomes.
type Outcome = (u32, Vec<u64>, bool, Vec<String>);

async fn storm(admission: Option<AdmissionConfig>) -> (Vec<usize>, Vec<Outcome>, Duration) {
    let backends = echo_backends(3).await;
    let mut cfg = config(&[backends[0].addr, backends[1].addr, backends[2].addr]);
    if let Some(a) = admission {
        cfg.pools[0].admission = a;
    }
    let sluice = Sluice::with_config(cfg).await;
    let mut clients = Vec::new();
    while clients.len() < 1000 {
        clients.extend(join_all((0..100).map(|_| sluice.ws_named("/ws"))).await);
    }
    let mut on_b1 = Vec::new();
    let mut others = Vec::new();
    for (ws, name) in clients {
        if name == "b1" {
            on_b1.push(ws);
        } else {
            others.push(ws);
        }
    }
    let url = sluice.url("/ws");
    let tasks: Vec<_> = on_b1
        .into_iter()
        .map(|ws| tokio::spawn(storm_client(url.clone(), ws)))
        .collect();
    let killed = Instant::now();
    backends[0].kill();
    let outcomes: Vec<_> = join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .collect();
    let all_back = killed.elapsed();
    let mut curve = vec![0usize; 40];
    for b in &backends[1..] {
        for t in b.accepted_since(killed) {
            let slot = (t.duration_since(killed).as_millis() / 100) as usize;
            if slot < curve.len() {
                curve[slot] += 1;
            }
        }
    }
    drop(others);
    (curve, outcomes, all_back)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_is_admitted_at_the_configured_rate() {
    let _heavy = heavy().await;
    let (burst, rate) = (20.0, 100.0);
    let admission = AdmissionConfig {
        connect_rate: rate,
        burst,
        queue_timeout: Duration::from_millis(500),
        queue_size: 10_000,
    };
    let (curve, outcomes, all_back) = storm(Some(admission)).await;
    // Per survivor: never more than burst + rate x t new connections by t.
    let mut total = 0;
    for (slot, n) in curve.iter().enumerate() {
        total += n;
        let t = (slot + 1) as f64 * 0.1;
        assert!(
            total as f64 <= 2.0 * (burst + rate * t) + 2.0,
            "{total} by {t:.1} s: {curve:?}"
        );
    }
    let refused: u32 = outcomes.iter().map(|o| o.0).sum();
    let stuck: Vec<_> = outcomes.iter().filter(|o| !o.2).collect();
    assert!(stuck.is_empty(), "clients that never got back: {stuck:?}");
    assert!(refused > 0, "some clients had to wait their turn");
    assert!(
        outcomes
            .iter()
            .flat_map(|o| &o.1)
            .all(|s| (1..=5).contains(s))
    );
    let (plain_curve, plain, plain_back) = storm(None).await;
    // Without admission everyone is let through at once (nothing to assert
    // but that they all got back; the curve is the point).
    let bad: Vec<_> = plain.iter().filter(|o| !o.2).collect();
    assert!(bad.is_empty(), "without admission: {bad:?}");
    println!(
        "with admission ({rate}/s, burst {burst} per backend): all back after {all_back:?}, {refused} 503s; new connections per 100 ms: {curve:?}"
    );
    println!(
        "without admission: all back after {plain_back:?}; new connections per 100 ms: {plain_curve:?}"
    );
}

/// Regression (review): a client that gave up mid-upload counted as a
/// backend failure, so three of them ejected a healthy backend.
#[tokio::test]
async fn clients_abandoning_uploads_do_not_eject_a_backend() {
    use tokio::io::AsyncWriteExt;
    let backends = echo_backends(1).await;
    let sluice = Sluice::start(&[&backends[0]]).await;
    for _ in 0..5 {
        let mut s = tokio::net::TcpStream::connect(sluice.addr)
            .await
            .expect("connect");
        s.write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc")
            .await
            .expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(s);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state(&sluice, 0), "up");
    assert_eq!(sluice.http().await.get("/after").await.status, 200);
}

/// Regression (review): a client that left while waiting for admission
/// stayed counted as waiting, which stopped rebalancing for good.
#[tokio::test]
async fn a_waiter_that_leaves_is_no_longer_counted() {
    let backends = echo_backends(1).await;
    let mut cfg = config(&[backends[0].addr]);
    cfg.pools[0].admission = AdmissionConfig {
        connect_rate: 0.1,
        burst: 1.0,
        queue_timeout: Duration::from_secs(5),
        queue_size: 100,
    };
    let sluice = Sluice::with_config(cfg).await;
    let _first = sluice.ws_named("/ws").await;
    let url = sluice.url("/ws");
    let waiter =
        tokio::spawn(async move { tokio_tungstenite::connect_async(url).await.map(|_| ()) });
    let stats = sluice.registry().pools()[0].stats.clone();
    let pool = || &stats.admission_waiting;
    eventually(5, "waiting", || {
        pool().load(std::sync::atomic::Ordering::Relaxed) == 1
    })
    .await;
    waiter.abort();
    eventually(5, "no longer counted", || {
        pool().load(std::sync::atomic::Ordering::Relaxed) == 0
    })
    .await;
}

/// Regression (review): admission took a token for every HTTP request,
/// also those carried by a kept-alive upstream connection.
#[tokio::test]
async fn keep_alive_requests_need_no_admission_token() {
    let backends = echo_backends(1).await;
    let mut cfg = config(&[backends[0].addr]);
    cfg.pools[0].admission = AdmissionConfig {
        connect_rate: 1.0,
        burst: 1.0,
        queue_timeout: Duration::ZERO,
        queue_size: 100,
    };
    let sluice = Sluice::with_config(cfg).await;
    let mut client = sluice.http().await;
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(client.get("/k").await.status);
        }
        v
    };
    assert_eq!(statuses, [200; 5]);
}

/// Regression (review): concurrent connections could overshoot
/// max_connections_per_backend (check and count were two steps).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_per_backend_holds_under_concurrency() {
    let backends = echo_backends(1).await;
    let mut cfg = config(&[backends[0].addr]);
    cfg.pools[0].max_connections_per_backend = 5;
    cfg.pools[0].admission.queue_timeout = Duration::ZERO;
    let sluice = Sluice::with_config(cfg).await;
    let url = sluice.url("/ws");
    let attempts = join_all((0..40).map(|_| {
        let url = url.clone();
        tokio::spawn(async move {
            tokio_tungstenite::connect_async(url)
                .await
                .map(|(ws, _)| ws)
        })
    }))
    .await;
    let connected: Vec<_> = attempts
        .into_iter()
        .filter_map(|r| r.expect("task").ok())
        .collect();
    assert_eq!(connected.len(), 5);
    eventually(5, "five at the backend", || backends[0].ws_open() == 5).await;
}
