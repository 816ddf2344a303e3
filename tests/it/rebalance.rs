//! Automatic rebalancing with real sockets.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sluice::config::RebalanceConfig;
use tokio_util::sync::CancellationToken;

use crate::support::*;

#[tokio::test]
async fn an_empty_backend_is_filled_gently_and_a_level_pool_is_left_alone() {
    let _heavy = heavy().await;
    const CLIENTS: usize = 900;
    let interval = Duration::from_millis(500);
    let backends = echo_backends(3).await;
    let mut cfg = config(&[backends[0].addr, backends[1].addr, backends[2].addr]);
    cfg.pools[0].rebalance = RebalanceConfig {
        interval,
        ..RebalanceConfig::default()
    };
    let sluice = Sluice::with_config(cfg).await;
    let admin = sluice.admin();
    // b3 joins after the clients: keep it out of rotation while they connect.
    admin.drain("app", "b3", Some("0s")).await.expect("drain");
    let stop = CancellationToken::new();
    let clients = chatters(&sluice, CLIENTS, Duration::from_millis(300), &stop);
    eventually(30, "all connected to b1 and b2", || {
        backends[0].ws_open() + backends[1].ws_open() == CLIENTS
    })
    .await;
    assert_eq!(backends[2].ws_open(), 0);

    let started = Instant::now();
    admin.undrain("app", "b3").await.expect("undrain");
    let counts = || backends.iter().map(|b| b.ws_open()).collect::<Vec<_>>();
    let level = |c: &[usize]| {
        c.iter().sum::<usize>() == CLIENTS && c.iter().all(|&n| (240..=360).contains(&n))
    };
    let mut curve = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = counts();
        curve.push(c.clone());
        if level(&c) {
            break;
        }
        assert!(Instant::now() < deadline, "not level after 30 s: {curve:?}");
        tokio::time::sleep(interval).await;
    }
    let level_after = started.elapsed();

    // Level now: ten more intervals without a single close.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let shed = |s: &Sluice| {
        s.registry().pools()[0]
            .backends
            .iter()
            .map(|b| b.rebalance_shed.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let before = shed(&sluice);
    tokio::time::sleep(interval * 10).await;
    assert_eq!(
        shed(&sluice),
        before,
        "a level pool shed connections: {:?}",
        counts()
    );
    let status = sluice.status().await;
    let last = status.pools[0]
        .rebalance
        .as_ref()
        .and_then(|r| r.last.as_ref())
        .expect("a rebalance decision");
    assert_eq!(last.note, "level", "{last:?}");
    assert_eq!(last.total, CLIENTS as u64);

    let (stats, t) = finish_chat(&stop, clients).await;
    let (lost, wrong, resent) = (t.lost, t.wrong, t.resent);
    let moved = stats.iter().filter(|s| !s.closes.is_empty()).count();
    assert_eq!((lost, wrong), (0, 0));
    assert!(resent <= 5, "{resent} messages had to be sent again");
    assert!(
        stats.iter().all(|s| s.closes.len() <= 1),
        "a client was moved twice"
    );
    assert!(
        stats
            .iter()
            .flat_map(|s| &s.closes)
            .all(|(code, _)| *code == 1012)
    );
    // Gentle: no more moves than needed to come within tolerance, plus a little.
    assert!((240..=330).contains(&moved), "{moved} clients moved");
    println!(
        "level after {level_after:?}, {moved} clients moved, {resent} resent; counts every {interval:?}: {curve:?}"
    );
}
