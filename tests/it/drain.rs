//! Draining a backend: gradual, complete, and nobody loses a message.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use sluice::admin::api::BackendState;
use tokio_util::sync::CancellationToken;

use crate::support::*;

#[tokio::test]
async fn drain_closes_gradually_with_1012_and_loses_nothing() {
    let _heavy = heavy().await;
    const CLIENTS: usize = 600;
    let window = Duration::from_secs(3);
    let backends = echo_backends(3).await;
    let sluice = Sluice::start(&[&backends[0], &backends[1], &backends[2]]).await;
    let stop = CancellationToken::new();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(tokio::spawn(chat(
            sluice.url("/ws"),
            Duration::from_millis(200),
            stop.clone(),
        )));
    }
    eventually(30, "all clients connected", || {
        backends.iter().map(|b| b.ws_open()).sum::<usize>() == CLIENTS
    })
    .await;
    let on_b1 = backends[0].ws_open();
    let accepted_before = backends[0].stats.ws_accepted.load(Ordering::SeqCst);
    // Let every client exchange a few messages first.
    tokio::time::sleep(Duration::from_millis(600)).await;

    let started = Instant::now();
    sluice
        .admin()
        .drain("app", "b1", Some("3s"))
        .await
        .expect("drain accepted");
    eventually(15, "b1 drained", || backends[0].ws_open() == 0).await;
    let drained_after = started.elapsed();
    eventually(10, "everyone reconnected", || {
        backends[1].ws_open() + backends[2].ws_open() == CLIENTS
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (stats, t) = finish_chat(&stop, clients).await;
    let (lost, wrong, echoed, resent) = (t.lost, t.wrong, t.echoed, t.resent);
    assert_eq!((lost, wrong), (0, 0), "{echoed} echoed");
    // Only a message sent in the instant the Close was on its way needs
    // sending again; answers already on their way are never cut.
    assert!(resent <= 10, "{resent} messages had to be sent again");
    // Every client of b1, and only those, got exactly one Close 1012, and
    // reconnected elsewhere.
    let mut close_times = Vec::new();
    for s in &stats {
        if s.backends[0] == "b1" {
            assert_eq!(s.closes.len(), 1, "{s:?}");
            assert_eq!(s.closes[0].0, 1012);
            close_times.push(s.closes[0].1.duration_since(started));
            assert!(
                s.backends[1..].iter().all(|b| b != "b1"),
                "reconnected to b1: {s:?}"
            );
        } else {
            assert!(s.closes.is_empty(), "{s:?}");
        }
    }
    assert_eq!(close_times.len(), on_b1);
    assert_eq!(
        backends[0].stats.ws_accepted.load(Ordering::SeqCst),
        accepted_before,
        "no new connection to b1"
    );
    // Spread over the window: no tenth of it has more than 1.5x its share
    // (plus a little for the quiet-point wait of each close).
    let mut tenths: HashMap<usize, usize> = HashMap::new();
    for t in &close_times {
        *tenths
            .entry(((t.as_secs_f64() / window.as_secs_f64()) * 10.0) as usize)
            .or_default() += 1;
    }
    let share = on_b1 as f64 / 10.0;
    let busiest = tenths.values().copied().max().unwrap_or(0);
    assert!(
        busiest as f64 <= 1.5 * share + 4.0,
        "closes per tenth of the window: {tenths:?}"
    );
    assert!(
        tenths.keys().all(|&k| k <= 12),
        "closes well after the window: {tenths:?}"
    );
    assert!(
        drained_after < window + Duration::from_secs(3),
        "drained after {drained_after:?}"
    );
    let status = sluice.status().await;
    assert_eq!(status.pools[0].backends[0].state, BackendState::Drained);
    println!(
        "drain of {on_b1} over {window:?}: busiest tenth {busiest}, drained after {drained_after:?}, {echoed} echoes"
    );
}

#[tokio::test]
async fn undrain_puts_the_backend_back_and_drain_of_empty_backend_is_immediate() {
    let backends = echo_backends(2).await;
    let sluice = Sluice::start(&[&backends[0], &backends[1]]).await;
    let admin = sluice.admin();
    let v = admin.drain("app", "b1", None).await.expect("drain");
    assert_eq!(v.state, BackendState::Draining);
    assert_eq!(
        v.drain.map(|d| d.window_ms),
        Some(120_000),
        "the pool's default window"
    );
    eventually(5, "drained", || {
        sluice.registry().pools()[0].backends[0].state().as_str() == "drained"
    })
    .await;
    // New connections avoid it, WebSocket or HTTP.
    for _ in 0..4 {
        let (_ws, name) = sluice.ws_named("/ws").await;
        assert_eq!(name, "b2");
        assert_eq!(sluice.http().await.get("/x").await.backend(), "b2");
    }
    admin.undrain("app", "b1").await.expect("undrain");
    let (_ws, name) = sluice.ws_named("/ws").await;
    assert_eq!(
        name, "b1",
        "least_conn sends the next one to the emptied backend"
    );
}

/// How long a close waits for an answer to the client (the tunnel's
/// `QUIET_MAX_WAIT`), as the README documents it.
fn sluice_quiet_max_wait() -> Duration {
    Duration::from_secs(2)
}

#[tokio::test]
async fn shutdown_spreads_closes_over_the_drain_window() {
    let backends = echo_backends(1).await;
    let mut cfg = config(&[backends[0].addr]);
    cfg.pools[0].drain.window = Duration::from_secs(1);
    let mut sluice = Sluice::with_config(cfg).await;
    let mut sockets = Vec::new();
    for _ in 0..20 {
        sockets.push(sluice.ws_named("/ws").await.0);
    }
    // Idle connections (silent for longer than the close's longest wait
    // for an answer): each close goes out when it is due.
    tokio::time::sleep(sluice_quiet_max_wait() + Duration::from_millis(100)).await;
    let started = Instant::now();
    sluice.shutdown.cancel();
    let times = join_all(sockets.into_iter().map(|mut ws| async move {
        use futures_util::StreamExt;
        match within(5, "close", ws.next()).await {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 1001)
            }
            other => panic!("expected Close 1001, got {other:?}"),
        }
        let at = started.elapsed();
        while within(5, "close handshake", ws.next()).await.is_some() {}
        at
    }))
    .await;
    let first_half = times
        .iter()
        .filter(|t| **t < Duration::from_millis(500))
        .count();
    assert!(
        (6..=14).contains(&first_half),
        "closes not spread: {times:?}"
    );
    sluice.stop().await;
}

/// Regression (review): an undrain right after a drain of an empty
/// backend could be overwritten by the drain task marking it drained.
#[tokio::test]
async fn undrain_right_after_drain_sticks() {
    let backends = echo_backends(2).await;
    let sluice = Sluice::start(&[&backends[0], &backends[1]]).await;
    let admin = sluice.admin();
    for _ in 0..30 {
        admin.drain("app", "b1", None).await.expect("drain");
        admin.undrain("app", "b1").await.expect("undrain");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        sluice.registry().pools()[0].backends[0].state().as_str(),
        "up"
    );
}
