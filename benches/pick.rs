//! Cost of one pick, per balancing algorithm (criterion).
//!
//! `cargo bench --bench pick`. Each pick sees 8 backends with live counts,
//! as `Upstream` hands them to the balancer; `sticky` measures finding the
//! pinned backend from a Cookie header.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use hyper::header::{COOKIE, HeaderMap, HeaderValue};
use sluice::balance::hash::hash64;
use sluice::balance::sticky::Sticky;
use sluice::balance::{Balancer, Load};
use sluice::config::{Algorithm, BackendConfig, HashKey, PoolConfig, StickyConfig};

fn pool(algorithm: Algorithm) -> PoolConfig {
    let backends = (0..8)
        .map(|i| BackendConfig {
            name: format!("app-{i}"),
            address: format!("127.0.0.1:{}", 4000 + i).parse().expect("address"),
            weight: 1,
            tls: None,
        })
        .collect();
    let mut p = PoolConfig::new("app", backends);
    p.algorithm = algorithm;
    p
}

fn picks(c: &mut Criterion) {
    let loads: Vec<Load> = (0..8)
        .map(|i| Load {
            active: 1000 + i * 7,
            weight: 1.0,
            ramp: 1.0,
            eligible: i != 3,
        })
        .collect();
    let mut group = c.benchmark_group("pick");
    for (name, algorithm) in [
        ("least_conn", Algorithm::LeastConn),
        ("round_robin", Algorithm::RoundRobin),
        ("p2c", Algorithm::P2c),
        ("hash", Algorithm::Hash(HashKey::Header("x-user".into()))),
    ] {
        let balancer = Balancer::new(&pool(algorithm));
        let mut user = 0u64;
        group.bench_function(name, |b| {
            b.iter(|| {
                user += 1;
                // The hash of the key is part of a hash pick's cost.
                let key = hash64(&user.to_le_bytes());
                black_box(balancer.pick(black_box(&loads), Some(key)))
            })
        });
    }
    let sticky = Sticky::new(
        StickyConfig {
            secret: Some(b"bench secret, 16+ bytes".to_vec()),
            ..StickyConfig::default()
        },
        "app",
        &[
            "app-0", "app-1", "app-2", "app-3", "app-4", "app-5", "app-6", "app-7",
        ],
        &[0; 32],
    );
    let value = sticky.set_cookie(5, 0x1234_5678).expect("cookie");
    let pair = value
        .to_str()
        .expect("ascii")
        .split(';')
        .next()
        .expect("pair")
        .to_string();
    let mut headers = HeaderMap::new();
    headers.insert(
        COOKIE,
        HeaderValue::from_str(&format!("theme=dark; {pair}; lang=en")).expect("ascii"),
    );
    group.bench_function("sticky_cookie", |b| {
        b.iter(|| black_box(sticky.pinned(black_box(&headers))))
    });
    group.finish();
}

criterion_group!(benches, picks);
criterion_main!(benches);
