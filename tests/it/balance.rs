//! How new connections spread over backends.

use std::collections::HashMap;

use futures_util::SinkExt;
use futures_util::future::join_all;
use sluice::config::Algorithm;

use crate::support::*;

/// Opens `n` WebSockets, `batch` at a time, and returns them with the
/// backend each reached.
async fn open_many(sluice: &Sluice, n: usize, batch: usize) -> Vec<(Ws, String)> {
    let mut out = Vec::new();
    while out.len() < n {
        let k = batch.min(n - out.len());
        out.extend(join_all((0..k).map(|_| sluice.ws_named("/ws"))).await);
    }
    out
}

fn counts(conns: &[(Ws, String)]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for (_, name) in conns {
        *m.entry(name.clone()).or_default() += 1;
    }
    m
}

#[tokio::test]
async fn least_conn_spreads_evenly_and_refills_an_emptied_backend() {
    let backends = echo_backends(3).await;
    let sluice = Sluice::start(&[&backends[0], &backends[1], &backends[2]]).await;
    let mut conns = open_many(&sluice, 300, 50).await;
    for b in &backends {
        let n = b.ws_open();
        assert!(
            (98..=102).contains(&n),
            "{} has {n} of 300: {:?}",
            b.name,
            counts(&conns)
        );
    }
    // Top up to 150 each, then close every WebSocket on b1.
    conns.extend(open_many(&sluice, 150, 25).await);
    eventually(5, "450 open", || {
        backends.iter().map(|b| b.ws_open()).sum::<usize>() == 450
    })
    .await;
    let (mut on_b1, rest): (Vec<_>, Vec<_>) = conns.into_iter().partition(|(_, name)| name == "b1");
    let closed = on_b1.len();
    assert!((148..=152).contains(&closed), "b1 had {closed}");
    join_all(on_b1.iter_mut().map(|(ws, _)| ws.close(None))).await;
    eventually(10, "b1 empty", || {
        backends[0].ws_open() == 0 && sluice.registry().pools()[0].backends[0].ws_count() == 0
    })
    .await;
    // The next ones all go to the emptied backend.
    let next = open_many(&sluice, closed, 25).await;
    let c = counts(&next);
    assert_eq!(c.get("b1").copied().unwrap_or(0), closed, "{c:?}");
    drop(rest);
}

#[tokio::test]
async fn least_conn_honours_weights() {
    let backends = echo_backends(2).await;
    let mut cfg = config(&[backends[0].addr, backends[1].addr]);
    cfg.pools[0].backends[1].weight = 2;
    let sluice = Sluice::with_config(cfg).await;
    let conns = open_many(&sluice, 60, 1).await;
    let c = counts(&conns);
    assert_eq!((c["b1"], c["b2"]), (20, 40));
}

#[tokio::test]
async fn round_robin_follows_weights() {
    let backends = echo_backends(3).await;
    let mut cfg = config(&[backends[0].addr, backends[1].addr, backends[2].addr]);
    cfg.pools[0].algorithm = Algorithm::RoundRobin;
    for (i, w) in [1, 2, 3].into_iter().enumerate() {
        cfg.pools[0].backends[i].weight = w;
    }
    let sluice = Sluice::with_config(cfg).await;
    let mut client = sluice.http().await;
    let mut seen = HashMap::<String, usize>::new();
    for _ in 0..60 {
        *seen.entry(client.get("/rr").await.backend()).or_default() += 1;
    }
    assert_eq!((seen["b1"], seen["b2"], seen["b3"]), (10, 20, 30));
}

#[tokio::test]
async fn in_flight_http_counts_for_least_conn() {
    // A WebSocket on b1 makes the next HTTP request go to b2.
    let backends = echo_backends(2).await;
    let sluice = Sluice::start(&[&backends[0], &backends[1]]).await;
    let (mut ws, first) = sluice.ws_named("/ws").await;
    let mut client = sluice.http().await;
    let reply = client.get("/x").await;
    assert_ne!(reply.backend(), first);
    ws.send(tokio_tungstenite::tungstenite::Message::text("still here"))
        .await
        .expect("send");
}
