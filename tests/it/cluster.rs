//! Cluster mode: two sluice instances share their counts through a real
//! redis-server, and keep serving on their own view when it is gone.

use std::time::Duration;

use sluice::config::ClusterConfig;

use crate::support::redis::{Redis, redis_here};
use crate::support::*;

/// An instance named `name` of the cluster on `redis`, over `backends`,
/// without rebalancing.
async fn instance(name: &str, redis: &Redis, backends: &[sluice::demo::EchoBackend]) -> Sluice {
    instance_with(name, redis, backends, None).await
}

/// An instance, rebalancing every `rebalance` if given.
async fn instance_with(
    name: &str,
    redis: &Redis,
    backends: &[sluice::demo::EchoBackend],
    rebalance: Option<Duration>,
) -> Sluice {
    let mut cfg = config(&backends.iter().map(|b| b.addr).collect::<Vec<_>>());
    match rebalance {
        Some(interval) => cfg.pools[0].rebalance.interval = interval,
        None => cfg.pools[0].rebalance.enabled = false,
    }
    cfg.cluster = Some(ClusterConfig {
        redis: redis.url(),
        password: None,
        instance: name.into(),
        publish_interval: Duration::from_millis(200),
    });
    Sluice::with_config(cfg).await
}

async fn open(sluice: &Sluice, n: usize) -> Vec<Ws> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(sluice.ws_named("/ws").await.0);
    }
    out
}

/// Each backend's connections through the other instances, as `sluice`
/// last read them.
fn remote(sluice: &Sluice) -> Vec<usize> {
    let backends = sluice.registry().backends();
    backends
        .iter()
        .map(|b| b.remote.load(std::sync::atomic::Ordering::Relaxed))
        .collect()
}

/// Each backend's connections through `sluice` itself.
fn own(sluice: &Sluice) -> Vec<usize> {
    sluice
        .registry()
        .backends()
        .iter()
        .map(|b| b.active())
        .collect()
}

/// `n` WebSockets through `sluice`, each past one echo.
async fn open_and_echo(sluice: &Sluice, n: usize) -> Vec<Ws> {
    let mut out = open(sluice, n).await;
    for ws in &mut out {
        echo(ws, tokio_tungstenite::tungstenite::Message::text("x")).await;
    }
    out
}

fn counts(backends: &[sluice::demo::EchoBackend]) -> Vec<usize> {
    backends.iter().map(|b| b.ws_open()).collect()
}

/// `n1` chat clients through `lb1` and `n2` through `lb2` (a message
/// each per `every`), once all of them are on `backends`.
async fn chatters_on_both(
    (lb1, n1): (&Sluice, usize),
    (lb2, n2): (&Sluice, usize),
    every: Duration,
    backends: &[sluice::demo::EchoBackend],
    stop: &tokio_util::sync::CancellationToken,
) -> Vec<tokio::task::JoinHandle<ChatStats>> {
    let mut clients = chatters(lb1, n1, every, stop);
    clients.extend(chatters(lb2, n2, every, stop));
    eventually(30, "every client connected", || {
        counts(backends).iter().sum::<usize>() == n1 + n2
    })
    .await;
    clients
}

async fn cluster_up(sluice: &Sluice) -> f64 {
    metric(&sluice.metrics().await, "sluice_cluster_up")
}

/// Waits until every one of `sluices` has `sluice_cluster_up` at `value`.
async fn wait_up(sluices: &[&Sluice], value: f64, what: &str) {
    within(15, what, async {
        loop {
            let mut all = true;
            for s in sluices {
                all &= cluster_up(s).await == value;
            }
            if all {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// A redis-server, `n` echo backends and two instances on them, lb-1
/// and lb-2.
async fn two_instances(n: usize) -> (Redis, Vec<sluice::demo::EchoBackend>, Sluice, Sluice) {
    let redis = Redis::start().await;
    let backends = echo_backends(n).await;
    let lb1 = instance("lb-1", &redis, &backends).await;
    let lb2 = instance("lb-2", &redis, &backends).await;
    (redis, backends, lb1, lb2)
}

#[tokio::test]
async fn a_second_instance_places_its_clients_by_the_cluster_wide_counts() {
    if !redis_here() {
        return;
    }
    let _heavy = heavy().await;
    let (_redis, backends, lb1, lb2) = two_instances(3).await;
    // Instance 1 fills b1 and b2 only (b3 drained through it, on both).
    lb1.admin()
        .drain("app", "b3", Some("0s"))
        .await
        .expect("drain");
    let first = open(&lb1, 300).await;
    assert_eq!(counts(&backends), [150, 150, 0]);
    lb1.admin().undrain("app", "b3").await.expect("undrain");
    eventually(10, "lb-2 undrains b3 too", || {
        state(&lb2, 2) == sluice::registry::BackendState::Up
    })
    .await;
    // Instance 2 learns of them through Redis.
    within(10, "lb-2 sees lb-1's counts", async {
        loop {
            let seen: Vec<usize> = lb2
                .registry()
                .backends()
                .iter()
                .map(|b| b.cluster_active())
                .collect();
            if seen == [150, 150, 0] {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(cluster_up(&lb2).await, 1.0);
    let second = open(&lb2, 300).await;
    // Level cluster-wide: lb-2 sent most of its clients to b3, which it
    // has none of on its own view's other backends.
    let totals = counts(&backends);
    assert!(
        totals.iter().all(|&n| (190..=210).contains(&n)),
        "cluster-wide counts {totals:?}"
    );
    let on_lb2 = own(&lb2);
    assert!(on_lb2[2] >= 180, "lb-2 alone: {on_lb2:?}");
    // Its status names both instances with their counts.
    let cluster = within(10, "status with the cluster", async {
        loop {
            let cluster = lb2.status().await.cluster.expect("cluster mode");
            let sum: u64 = cluster
                .instances
                .iter()
                .flat_map(|i| &i.backends)
                .map(|b| b.connections)
                .sum();
            if sum == 600 {
                return cluster;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(cluster.instance, "lb-2");
    assert!(cluster.redis_up);
    let names: Vec<&str> = cluster.instances.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["lb-1", "lb-2"]);
    let lb1_counts: Vec<u64> = cluster.instances[0]
        .backends
        .iter()
        .map(|b| b.connections)
        .collect();
    assert_eq!(lb1_counts, [150, 150, 0]);
    drop((first, second));
}

#[tokio::test]
async fn without_redis_each_instance_balances_on_its_own_view_and_recovers() {
    if !redis_here() {
        return;
    }
    let _heavy = heavy().await;
    let (mut redis, _backends, lb1, lb2) = two_instances(3).await;
    let mut held = open(&lb1, 30).await;
    eventually(10, "lb-2 sees lb-1's 30", || {
        remote(&lb2).iter().sum::<usize>() == 30
    })
    .await;

    redis.kill9();
    wait_up(&[&lb2], 0.0, "lb-2 notices").await;
    // Connected clients notice nothing.
    for ws in held.iter_mut() {
        echo(
            ws,
            tokio_tungstenite::tungstenite::Message::text("still here"),
        )
        .await;
    }
    // New connections are balanced on lb-2's own view (the others' counts
    // are dropped, not frozen): 30 spread evenly.
    let fresh = open(&lb2, 30).await;
    assert_eq!(own(&lb2), [10, 10, 10]);
    assert_eq!(remote(&lb2), [0, 0, 0]);

    redis.restart().await;
    wait_up(&[&lb1, &lb2], 1.0, "both back").await;
    eventually(10, "lb-1 sees lb-2's 30 again", || {
        remote(&lb1).iter().sum::<usize>() == 30
    })
    .await;
    drop((held, fresh));
}

#[tokio::test]
async fn an_instance_killed_stops_counting_after_the_ttl() {
    if !redis_here() {
        return;
    }
    let _load = LoadShare::take().await;
    let redis = Redis::start().await;
    let backends = echo_backends(1).await;
    let lb2 = instance("lb-2", &redis, &backends).await;
    // lb-1 is the real binary, killed with SIGKILL: it never says goodbye.
    let dir = crate::support::process::TempDir::new("cluster-killed").expect("dir");
    let port = crate::support::process::free_port().expect("port");
    let text = format!(
        "[admin]\nenabled = false\n\
         [cluster]\nredis = \"{}\"\ninstance = \"lb-1\"\npublish_interval = \"200ms\"\n\
         [[listener]]\nbind = \"127.0.0.1:{port}\"\npool = \"app\"\n\
         [[pool]]\nname = \"app\"\n[[pool.backend]]\nname = \"b1\"\naddress = \"{}\"\n",
        redis.url(),
        backends[0].addr
    );
    let path = dir.write("sluice.toml", &text).expect("config");
    let mut lb1 = crate::support::process::Proc(
        std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["run", "--config"])
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("sluice starts"),
    );
    let addr = format!("127.0.0.1:{port}").parse().expect("addr");
    wait_listening(addr).await;
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut ws = ws_connect(&format!("ws://{addr}/ws")).await;
        greeting(&mut ws).await;
        held.push(ws);
    }
    eventually(10, "lb-2 sees lb-1's 20", || remote(&lb2) == [20]).await;
    crate::support::process::send_signal(lb1.pid(), "KILL").expect("kill");
    lb1.wait_exit(Duration::from_secs(5)).expect("exited");
    let killed = std::time::Instant::now();
    eventually(10, "lb-1's counts expire", || remote(&lb2) == [0]).await;
    // Three publish intervals of TTL, read at lb-2's next round.
    assert!(
        killed.elapsed() >= Duration::from_millis(300),
        "dropped after {:?}: before its TTL",
        killed.elapsed()
    );
    drop(held);
}

#[tokio::test]
async fn a_password_from_its_file_opens_a_redis_that_asks_for_one() {
    if !redis_here() {
        return;
    }
    let redis = Redis::start_with(Some("s3cret-for-tests")).await;
    let backends = echo_backends(1).await;
    let dir = crate::support::process::TempDir::new("cluster-password").expect("dir");
    dir.write("redis.password", "s3cret-for-tests\n")
        .expect("file");
    let text = format!(
        "[cluster]\nredis = \"{}\"\npassword_file = \"redis.password\"\ninstance = \"lb-1\"\n\
         [[listener]]\nbind = \"127.0.0.1:0\"\npool = \"app\"\n\
         [[pool]]\nname = \"app\"\n[[pool.backend]]\nname = \"b1\"\naddress = \"{}\"\n",
        redis.url(),
        backends[0].addr
    );
    let path = dir.write("sluice.toml", &text).expect("config");
    let mut cfg = sluice::config::load(&path).expect("valid");
    cfg.admin = config(&[]).admin;
    let with = Sluice::with_config(cfg.clone()).await;
    wait_up(&[&with], 1.0, "up with the password").await;
    // Without it, Redis refuses: the instance says it is on its own.
    let mut without = cfg;
    if let Some(c) = &mut without.cluster {
        c.password = None;
        c.instance = "lb-2".into();
    }
    let without = Sluice::with_config(without).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(cluster_up(&without).await, 0.0);
}

#[tokio::test]
async fn a_redis_that_hangs_holds_no_connection_back() {
    if !redis_here() {
        return;
    }
    let _heavy = heavy().await;
    let (redis, _backends, lb1, lb2) = two_instances(3).await;
    wait_up(&[&lb1, &lb2], 1.0, "both up").await;
    // What two instances cost Redis, per second.
    let processed = |info: ::redis::Value| -> u64 {
        let text = match info {
            ::redis::Value::BulkString(b) => String::from_utf8_lossy(&b).to_string(),
            ::redis::Value::VerbatimString { text, .. } => text,
            other => panic!("INFO answered {other:?}"),
        };
        text.lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("total_commands_processed")
    };
    let before = processed(redis.cmd(&["INFO", "stats"]).await);
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = processed(redis.cmd(&["INFO", "stats"]).await);
    let per_instance = (after - before - 1) as f64 / started.elapsed().as_secs_f64() / 2.0;
    eprintln!("Redis commands per second per instance: {per_instance:.1}");
    // Every 200 ms, in two round trips: SET, SADD, SMEMBERS, HGETALL and
    // MGET of the plans, then MGET of the counts: 30 a second.
    assert!(per_instance <= 36.0, "{per_instance}");

    // 30 WebSockets opened and echoed while Redis answers, for reference.
    let awake = std::time::Instant::now();
    let reference = open_and_echo(&lb2, 30).await;
    eprintln!(
        "30 WebSockets opened and echoed while Redis answered, in {:?}",
        awake.elapsed()
    );
    drop(reference);

    // Redis hangs for 3 s: new WebSockets open and echo meanwhile, all
    // of them before it answers again.
    let sleeping = tokio::spawn({
        let url = redis.url();
        async move {
            let client = ::redis::Client::open(url).expect("client");
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("connection");
            conn.set_response_timeout(Duration::from_secs(10));
            let _: ::redis::Value = ::redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg(3)
                .query_async(&mut conn)
                .await
                .expect("slept");
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let opened = std::time::Instant::now();
    let fresh = open_and_echo(&lb2, 30).await;
    let took = opened.elapsed();
    assert!(
        !sleeping.is_finished(),
        "Redis woke before the 30 were done"
    );
    eprintln!("30 WebSockets opened and echoed while Redis slept, in {took:?}");
    wait_up(&[&lb2], 0.0, "lb-2 says it is on its own").await;
    sleeping.await.expect("DEBUG SLEEP returned");
    wait_up(&[&lb2], 1.0, "lb-2 back").await;
    drop(fresh);
}

/// Three backends and two instances rebalancing every `interval`, b3
/// out of rotation on both: drained through lb-1, which tells lb-2.
async fn rebalancing_with_b3_drained(
    redis: &Redis,
    interval: Duration,
) -> (Vec<sluice::demo::EchoBackend>, Sluice, Sluice) {
    let backends = echo_backends(3).await;
    let lb1 = instance_with("lb-1", redis, &backends, Some(interval)).await;
    let lb2 = instance_with("lb-2", redis, &backends, Some(interval)).await;
    wait_up(&[&lb1, &lb2], 1.0, "both up").await;
    lb1.admin()
        .drain("app", "b3", Some("0s"))
        .await
        .expect("drain");
    eventually(10, "lb-2 drains b3 too", || {
        state(&lb2, 2) != sluice::registry::BackendState::Up
    })
    .await;
    (backends, lb1, lb2)
}

fn state(sluice: &Sluice, backend: usize) -> sluice::registry::BackendState {
    sluice.registry().backends()[backend].state()
}

/// WebSockets each backend's rebalancer closed through `sluice`.
fn shed(sluice: &Sluice) -> u64 {
    sluice
        .registry()
        .backends()
        .iter()
        .map(|b| b.rebalance_shed.load(std::sync::atomic::Ordering::Relaxed))
        .sum()
}

#[tokio::test]
async fn one_instance_plans_the_sheds_every_instance_closes_its_share() {
    if !redis_here() {
        return;
    }
    let _heavy = heavy().await;
    const CLIENTS: usize = 150; // per instance
    let interval = Duration::from_millis(500);
    let redis = Redis::start().await;
    let (backends, lb1, lb2) = rebalancing_with_b3_drained(&redis, interval).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let clients = chatters_on_both(
        (&lb1, CLIENTS),
        (&lb2, CLIENTS),
        Duration::from_millis(300),
        &backends,
        &stop,
    )
    .await;
    // Undrained through the other instance.
    let started = std::time::Instant::now();
    lb2.admin().undrain("app", "b3").await.expect("undrain");
    let mut curve = Vec::new();
    within(60, "level cluster-wide", async {
        loop {
            let c = counts(&backends);
            curve.push(c.clone());
            if c.iter().sum::<usize>() == 2 * CLIENTS && c.iter().all(|&n| (80..=120).contains(&n))
            {
                return;
            }
            tokio::time::sleep(interval).await;
        }
    })
    .await;
    eprintln!("level after {:?}: {curve:?}", started.elapsed());
    // Two more intervals: nothing more is shed once level.
    tokio::time::sleep(interval * 2).await;
    let (m1, m2) = (lb1.metrics().await, lb2.metrics().await);
    let held = |m: &str| metric(m, "sluice_cluster_lease_held{pool=\"app\"}");
    let plans = |m: &str| metric(m, "sluice_cluster_plans_total{pool=\"app\"}");
    assert_eq!(held(&m1) + held(&m2), 1.0, "one lease holder");
    let (holder, other) = if held(&m1) == 1.0 {
        (&m1, &m2)
    } else {
        (&m2, &m1)
    };
    assert!(plans(holder) >= 1.0, "the holder planned");
    assert_eq!(plans(other), 0.0, "the other never planned");
    // Both closed their share of the plans: each has clients on b1 and b2.
    let (s1, s2) = (shed(&lb1), shed(&lb2));
    eprintln!(
        "shed by lb-1: {s1}, by lb-2: {s2}, plans: {}",
        plans(holder)
    );
    assert!(s1 > 0 && s2 > 0, "shed by lb-1 {s1}, by lb-2 {s2}");
    // 100 moves level the pool fully: within 1.25 times that.
    assert!(s1 + s2 <= 125, "{} closed for 100 moves", s1 + s2);
    let (_, totals) = finish_chat(&stop, clients).await;
    assert_eq!((totals.lost, totals.wrong), (0, 0), "{totals:?}");
}

#[tokio::test]
async fn a_drain_through_one_instance_closes_on_both_within_its_window() {
    if !redis_here() {
        return;
    }
    let _heavy = heavy().await;
    let (_redis, backends, lb1, lb2) = two_instances(3).await;
    wait_up(&[&lb1, &lb2], 1.0, "both up").await;
    let stop = tokio_util::sync::CancellationToken::new();
    let clients = chatters_on_both(
        (&lb1, 60),
        (&lb2, 60),
        Duration::from_millis(200),
        &backends,
        &stop,
    )
    .await;
    let on_b1 = [own(&lb1)[0], own(&lb2)[0]];
    assert!(on_b1.iter().all(|&n| n >= 10), "{on_b1:?}");

    // Drained through lb-2 over 3 s: lb-1 follows, over the same window.
    let window = Duration::from_secs(3);
    let asked = std::time::Instant::now();
    lb2.admin()
        .drain("app", "b1", Some("3s"))
        .await
        .expect("drain");
    within(5, "lb-1 drains b1", async {
        while state(&lb1, 0) == sluice::registry::BackendState::Up {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    eprintln!(
        "the drain reached lb-1 {:?} after it was asked of lb-2",
        asked.elapsed()
    );
    // Half way through, both are about half way (the closes are spread).
    tokio::time::sleep_until((asked + window / 2).into()).await;
    let half = [own(&lb1)[0], own(&lb2)[0]];
    for (left, before) in half.iter().zip(on_b1) {
        assert!(
            *left > 0 && *left < before,
            "half way through: {half:?} of {on_b1:?}"
        );
    }
    eventually(5, "b1 empty through both", || backends[0].ws_open() == 0).await;
    assert!(
        asked.elapsed() < window + Duration::from_millis(1500),
        "emptied after {:?}",
        asked.elapsed()
    );
    lb1.wait_backend_state(5, "b1", sluice::admin::api::BackendState::Drained)
        .await;
    // Undrained through lb-1: lb-2 follows.
    lb1.admin().undrain("app", "b1").await.expect("undrain");
    eventually(5, "lb-2 undrains b1", || {
        state(&lb2, 0) == sluice::registry::BackendState::Up
    })
    .await;
    let (_, totals) = finish_chat(&stop, clients).await;
    assert_eq!((totals.lost, totals.wrong), (0, 0), "{totals:?}");
}

#[tokio::test]
async fn without_redis_nobody_sheds_and_drains_made_meanwhile_reach_the_others() {
    if !redis_here() {
        return;
    }
    let _heavy = heavy().await;
    let interval = Duration::from_millis(300);
    let mut redis = Redis::start().await;
    let (backends, lb1, lb2) = rebalancing_with_b3_drained(&redis, interval).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let clients = chatters_on_both(
        (&lb1, 60),
        (&lb2, 60),
        Duration::from_millis(300),
        &backends,
        &stop,
    )
    .await;

    redis.kill9();
    wait_up(&[&lb1, &lb2], 0.0, "both on their own").await;
    // Undrained on lb-1 only, while Redis is away: it is back in rotation
    // there, and lb-2 learns of it once Redis is back.
    lb1.admin().undrain("app", "b3").await.expect("undrain");
    assert_eq!(state(&lb1, 2), sluice::registry::BackendState::Up);
    // The pool is skewed, but with no lease nobody sheds.
    tokio::time::sleep(interval * 6).await;
    assert_eq!((shed(&lb1), shed(&lb2)), (0, 0));
    let note = lb1.status().await.pools[0]
        .rebalance
        .as_ref()
        .and_then(|r| r.last.as_ref())
        .map(|l| l.note.clone());
    assert_eq!(
        note.as_deref(),
        Some("Redis unreachable: no instance sheds without the lease")
    );
    assert_eq!(state(&lb2, 2), sluice::registry::BackendState::Drained);

    redis.restart().await;
    wait_up(&[&lb1, &lb2], 1.0, "both back").await;
    eventually(10, "lb-2 undrains b3 as lb-1 was told", || {
        state(&lb2, 2) == sluice::registry::BackendState::Up
    })
    .await;
    within(60, "level once the lease can be had", async {
        while !counts(&backends).iter().all(|&n| (32..=48).contains(&n)) {
            tokio::time::sleep(interval).await;
        }
    })
    .await;
    assert!(shed(&lb1) + shed(&lb2) > 0);
    let (_, totals) = finish_chat(&stop, clients).await;
    assert_eq!((totals.lost, totals.wrong), (0, 0), "{totals:?}");
}

/// A sticky client that keeps its cookie and reconnects, whenever sluice
/// closes its WebSocket, through the next of `urls` in turn: it returns,
/// per connection, the instance it went through and the backend.
async fn hopper(
    urls: Vec<String>,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<(usize, String)> {
    use futures_util::StreamExt as _;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let mut seen = Vec::new();
    let mut jar: Option<String> = None;
    for k in 0..20 {
        if stop.is_cancelled() {
            break;
        }
        let through = k % urls.len();
        let mut req = urls[through]
            .as_str()
            .into_client_request()
            .expect("request");
        if let Some(c) = &jar {
            req.headers_mut()
                .insert("cookie", c.parse().expect("value"));
        }
        let (mut ws, resp) = tokio_tungstenite::connect_async(req)
            .await
            .expect("connect");
        if let Some(pin) = sticky_pin(resp.headers()) {
            jar = Some(pin);
        }
        seen.push((through, greeting(&mut ws).await));
        tokio::select! {
            _ = async { while let Some(Ok(_)) = ws.next().await {} } => {}
            () = stop.cancelled() => break,
        }
    }
    seen
}

#[tokio::test]
async fn a_sticky_client_moved_by_one_instance_is_placed_afresh_through_another() {
    if !redis_here() {
        return;
    }
    let _heavy = heavy().await;
    const CLIENTS: usize = 40;
    let interval = Duration::from_millis(500);
    let redis = Redis::start().await;
    let backends = echo_backends(2).await;
    let sticky = |name: &'static str| {
        let mut cfg = config(&backends.iter().map(|b| b.addr).collect::<Vec<_>>());
        cfg.pools[0].sticky = Some(test_sticky());
        cfg.pools[0].rebalance.interval = interval;
        cfg.pools[0].rebalance.min_excess = 2;
        cfg.pools[0].rebalance.max_shed_per_interval = 25;
        cfg.cluster = Some(ClusterConfig {
            redis: redis.url(),
            password: None,
            instance: name.into(),
            publish_interval: Duration::from_millis(200),
        });
        cfg
    };
    let lb1 = Sluice::with_config(sticky("lb-1")).await;
    let lb2 = Sluice::with_config(sticky("lb-2")).await;
    wait_up(&[&lb1, &lb2], 1.0, "both up").await;
    // Everybody pinned to b1 through lb-1, b2 drained meanwhile (on both).
    lb1.admin()
        .drain("app", "b2", Some("0s"))
        .await
        .expect("drain");
    eventually(10, "lb-2 drains b2 too", || {
        state(&lb2, 1) != sluice::registry::BackendState::Up
    })
    .await;
    let stop = tokio_util::sync::CancellationToken::new();
    let urls = vec![lb1.url("/ws"), lb2.url("/ws")];
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(hopper(urls.clone(), stop.clone())))
        .collect();
    eventually(30, "all on b1", || backends[0].ws_open() == CLIENTS).await;
    lb1.admin().undrain("app", "b2").await.expect("undrain");
    // lb-1 has them all, so it closes the 20 of the plan; they come back
    // through lb-2 with their pin to b1, and lb-2 places them afresh.
    let level = |c: &[usize]| c.iter().sum::<usize>() == CLIENTS && c.iter().all(|&n| n >= 16);
    within(30, "level", async {
        while !level(&counts(&backends)) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // Within tolerance (20 ± 4): nothing more is shed.
    tokio::time::sleep(interval * 2).await;
    let before = shed(&lb1) + shed(&lb2);
    tokio::time::sleep(interval * 4).await;
    let after = counts(&backends);
    let shed_after = shed(&lb1) + shed(&lb2);
    stop.cancel();
    let mut all = Vec::new();
    for client in clients {
        all.push(client.await.expect("client"));
    }
    assert_eq!(shed_after, before, "{after:?} {all:?}");
    assert!(level(&after), "stays level: {after:?} {all:?}");
    let mut moved = 0;
    for seen in all {
        if seen.len() > 1 {
            moved += 1;
            assert_eq!(seen.len(), 2, "moved once only: {seen:?}");
            assert_eq!(seen[1], (1, "b2".to_string()), "{seen:?}");
        }
    }
    assert!(moved >= 16, "{moved} moved");
    eprintln!("{moved} clients moved by lb-1 came back through lb-2, all placed afresh on b2");
    let placed = lb2.registry().pools()[0]
        .stats
        .sticky_moved
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(placed, moved as u64, "placed afresh by lb-2");
    assert_eq!(shed(&lb1) + shed(&lb2), moved as u64);
}

#[tokio::test]
async fn a_rollout_through_one_instance_empties_each_backend_through_both() {
    if !redis_here() {
        return;
    }
    let _heavy = heavy().await;
    let (_redis, backends, lb1, lb2) = two_instances(3).await;
    wait_up(&[&lb1, &lb2], 1.0, "both up").await;
    let stop = tokio_util::sync::CancellationToken::new();
    // Most clients through lb-1; the rollout goes through lb-2.
    let clients = chatters_on_both(
        (&lb1, 45),
        (&lb2, 9),
        Duration::from_millis(200),
        &backends,
        &stop,
    )
    .await;
    let pacing = sluice::ctl::Pacing {
        window: Some("1s".into()),
        drain_timeout: Duration::from_secs(20),
        health_timeout: Duration::from_secs(5),
        balance_timeout: Duration::from_secs(1),
    };
    let left_at_restart = std::sync::Mutex::new(Vec::new());
    sluice::ctl::rollout_with(&lb2.admin(), "app", &pacing, |_, b| {
        // ctl waited until the backend was empty through every instance.
        let i = backends
            .iter()
            .position(|e| e.name == b.name)
            .expect("a backend");
        left_at_restart.lock().expect("lock").push((
            b.name.clone(),
            backends[i].ws_open(),
            own(&lb1)[i],
        ));
        async { Ok(()) }
    })
    .await
    .expect("rollout");
    let left = left_at_restart.into_inner().expect("lock");
    assert_eq!(
        left,
        [
            ("b1".to_string(), 0, 0),
            ("b2".to_string(), 0, 0),
            ("b3".to_string(), 0, 0)
        ]
    );
    for i in 0..3 {
        assert_eq!(state(&lb1, i), sluice::registry::BackendState::Up);
    }
    let (_, totals) = finish_chat(&stop, clients).await;
    assert_eq!((totals.lost, totals.wrong), (0, 0), "{totals:?}");
    assert!(
        totals.closes >= 54,
        "every client moved at least once: {totals:?}"
    );
}
