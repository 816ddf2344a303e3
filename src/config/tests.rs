//! The config reader's tests: every error as the user sees it.

use std::path::Path;
use std::time::Duration;

use super::*;

fn check(text: &str) -> Result<Config, String> {
    parse(text, Path::new("sluice.toml")).map_err(|e| e.to_string())
}

const MINIMAL: &str = r#"
[[listener]]
bind = "127.0.0.1:8080"
pool = "app"

[[pool]]
name = "app"

[[pool.backend]]
name = "app-1"
address = "127.0.0.1:4000"
"#;

#[test]
fn minimal_config_gets_defaults() {
    let cfg = check(MINIMAL).expect("valid");
    assert_eq!(cfg.listeners[0].name, "listener1");
    assert_eq!(cfg.pools[0].algorithm, Algorithm::LeastConn);
    assert_eq!(cfg.pools[0].backends[0].weight, 1);
    assert_eq!(cfg.shutdown_timeout, Duration::from_secs(10));
}

#[test]
fn unknown_key_names_file_line_pool_and_key() {
    let text = MINIMAL.replace("name = \"app\"\n", "name = \"app\"\nalgoritm = \"x\"\n");
    assert_eq!(
        check(&text).unwrap_err(),
        "sluice.toml:8: pool \"app\": unknown key \"algoritm\""
    );
}

#[test]
fn bad_values_are_reported_with_their_line() {
    let text = MINIMAL.replace("\"127.0.0.1:4000\"", "\"nowhere\"");
    let err = check(&text).unwrap_err();
    assert!(err.starts_with("sluice.toml:11: pool \"app\" backend \"app-1\": key \"address\": invalid address \"nowhere\""), "{err}");
    let text = MINIMAL.replace(
        "name = \"app\"\n",
        "name = \"app\"\nconnect_timeout = \"0s\"\n",
    );
    assert!(
        check(&text)
            .unwrap_err()
            .contains("key \"connect_timeout\": 0s is out of range 1ms..=30days"),
        "{}",
        check(&text).unwrap_err()
    );
    let text = MINIMAL.replace(
        "name = \"app\"\n",
        "name = \"app\"\ndrain = { close_timeout = \"295000000000y\" }\n",
    );
    assert!(
        check(&text)
            .unwrap_err()
            .contains("pool \"app\" drain: key \"close_timeout\": 295000000000y is out of range"),
        "{}",
        check(&text).unwrap_err()
    );
    let text = format!("shutdown_timeout = \"soon\"\n{MINIMAL}");
    assert!(
        check(&text)
            .unwrap_err()
            .starts_with("sluice.toml:1: key \"shutdown_timeout\": invalid duration")
    );
    let text = MINIMAL.replace("pool = \"app\"", "pool = \"api\"");
    assert_eq!(
        check(&text).unwrap_err(),
        "sluice.toml:4: listener \"listener1\": key \"pool\": no pool named \"api\""
    );
    let text = MINIMAL.replace("address", "weight = 0\naddress");
    assert!(check(&text).unwrap_err().starts_with(
        "sluice.toml:11: pool \"app\" backend \"app-1\": key \"weight\": 0 is out of range"
    ));
    let text = MINIMAL.replace("bind = \"127.0.0.1:8080\"", "bind = 8080");
    assert_eq!(
        check(&text).unwrap_err(),
        "sluice.toml:3: listener \"listener1\": key \"bind\": expected a string, found an integer"
    );
}

#[test]
fn names_must_be_url_and_label_safe() {
    let text = MINIMAL.replace("name = \"app-1\"", "name = \"app 1/x\"");
    assert!(
        check(&text)
            .unwrap_err()
            .contains("backend name \"app 1/x\" may hold only"),
        "{}",
        check(&text).unwrap_err()
    );
    let text = MINIMAL.replace(
        "name = \"app\"\n",
        "name = \"app\"\nhealth = { path = \"/health check\" }\n",
    );
    assert!(check(&text).unwrap_err().contains("is not a request path"));
}

#[test]
fn tls_certificates_are_checked_at_load() {
    let dir = std::env::temp_dir().join(format!("sluice-config-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let a = rcgen::generate_simple_self_signed(vec!["a.test".to_string()]).expect("rcgen");
    let b = rcgen::generate_simple_self_signed(vec!["b.test".to_string()]).expect("rcgen");
    std::fs::write(dir.join("a.pem"), a.cert.pem()).expect("write");
    std::fs::write(dir.join("a.key"), a.signing_key.serialize_pem()).expect("write");
    std::fs::write(dir.join("b.key"), b.signing_key.serialize_pem()).expect("write");
    let mut params = rcgen::CertificateParams::new(vec!["old.test".to_string()]).expect("params");
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let old_key = rcgen::KeyPair::generate().expect("key");
    std::fs::write(
        dir.join("old.pem"),
        params.self_signed(&old_key).expect("cert").pem(),
    )
    .expect("write");
    std::fs::write(dir.join("old.key"), old_key.serialize_pem()).expect("write");
    let path = dir.join("sluice.toml");
    let with = |cert: &str, key: &str| {
        MINIMAL.replace(
            "pool = \"app\"\n",
            &format!("pool = \"app\"\ntls = {{ cert = \"{cert}\", key = \"{key}\" }}\n"),
        )
    };
    let err = |text: String| parse(&text, &path).map(|_| ()).unwrap_err().to_string();
    assert!(parse(&with("a.pem", "a.key"), &path).is_ok());
    let e = err(with("a.pem", "b.key"));
    assert!(
        e.contains("key \"cert\"") && e.contains("b.key") && e.contains("does the key belong to"),
        "{e}"
    );
    let e = err(with("missing.pem", "a.key"));
    assert!(e.contains("missing.pem"), "{e}");
    let e = err(with("old.pem", "old.key"));
    assert!(e.contains("old.pem: certificate expired on"), "{e}");
    // TLS towards a backend needs its name.
    let backend_tls = MINIMAL.replace(
        "address = \"127.0.0.1:4000\"",
        "address = \"127.0.0.1:4000\"\ntls = { ca = \"a.pem\" }",
    );
    let e = err(backend_tls);
    assert!(
        e.contains("backend \"app-1\" tls: missing key \"server_name\""),
        "{e}"
    );
}

#[test]
fn structure_errors() {
    assert!(check("").unwrap_err().contains("no [[pool]]"));
    assert!(
        check("[[pool]]\nname = \"a\"\n")
            .unwrap_err()
            .contains("pool \"a\": no [[pool.backend]]")
    );
    assert!(check("x = [").unwrap_err().starts_with("sluice.toml:1: "));
    let twice = format!(
        "{MINIMAL}\n[[pool]]\nname = \"app\"\n[[pool.backend]]\nname = \"b\"\naddress = \"127.0.0.1:1\"\n"
    );
    assert!(
        check(&twice)
            .unwrap_err()
            .contains("pool \"app\" is defined twice")
    );
}

#[test]
fn shipped_examples_are_valid() {
    for (name, text) in [
        (
            "examples/sluice.toml",
            include_str!("../../examples/sluice.toml"),
        ),
        (
            "examples/minimal.toml",
            include_str!("../../examples/minimal.toml"),
        ),
    ] {
        if let Err(e) = parse(text, Path::new(name)) {
            panic!("{e}");
        }
    }
}

#[test]
fn sticky_hash_and_p2c_settings() {
    let with =
        |extra: &str| MINIMAL.replace("name = \"app\"\n", &format!("name = \"app\"\n{extra}\n"));
    let cfg = check(&with("algorithm = \"hash\"\nkey = \"header:X-User\"")).expect("valid");
    assert_eq!(
        cfg.pools[0].algorithm,
        Algorithm::Hash(HashKey::Header("x-user".into()))
    );
    let cfg = check(&with("algorithm = \"hash\"\nkey = \"ip\"")).expect("valid");
    assert_eq!(cfg.pools[0].algorithm, Algorithm::Hash(HashKey::Ip));
    assert_eq!(
        check(&with("algorithm = \"p2c\"")).expect("valid").pools[0].algorithm,
        Algorithm::P2c
    );
    assert!(
        check(&with("algorithm = \"hash\""))
            .unwrap_err()
            .contains("\"hash\" needs a key")
    );
    assert!(
        check(&with("key = \"ip\""))
            .unwrap_err()
            .contains("only used with algorithm = \"hash\"")
    );
    assert!(
        check(&with("algorithm = \"hash\"\nkey = \"body:x\""))
            .unwrap_err()
            .contains("expected \"header:NAME\"")
    );
    let cfg = check(&with(
        "sticky = { cookie = \"S\", ttl = \"30m\", secure = true, same_site = \"strict\" }",
    ))
    .expect("valid");
    let s = cfg.pools[0].sticky.clone().expect("sticky");
    assert_eq!(
        (s.cookie.as_str(), s.ttl, s.secure, s.http_only, s.same_site),
        ("S", Duration::from_secs(1800), true, true, SameSite::Strict)
    );
    assert!(
        check(&with("sticky = { same_site = \"none\" }"))
            .unwrap_err()
            .contains("needs secure = true")
    );
    assert!(
        check(&with("sticky = { cookie = \"a b\" }"))
            .unwrap_err()
            .contains("may hold only")
    );
}

#[test]
fn rebalance_settings() {
    let text = MINIMAL.replace(
        "name = \"app\"\n",
        "name = \"app\"\nrebalance = { interval = \"500ms\", tolerance = 0.3, min_excess = 5, max_shed_per_interval = 20 }\n",
    );
    let r = check(&text).expect("valid").pools[0].rebalance;
    assert_eq!(
        (
            r.interval,
            r.tolerance,
            r.min_excess,
            r.max_shed_per_interval,
            r.enabled
        ),
        (Duration::from_millis(500), 0.3, 5, 20, true)
    );
    let text = MINIMAL.replace(
        "name = \"app\"\n",
        "name = \"app\"\nrebalance = { tolerance = \"lots\" }\n",
    );
    assert!(
        check(&text)
            .unwrap_err()
            .contains("pool \"app\" rebalance: key \"tolerance\": expected a number")
    );
    let text = MINIMAL.replace(
        "name = \"app\"\n",
        "name = \"app\"\nrebalance = { enabled = false, tolerance = 1 }\n",
    );
    assert!(!check(&text).expect("valid").pools[0].rebalance.enabled);
}

#[test]
fn algorithms_and_weights() {
    let text = MINIMAL.replace(
        "name = \"app\"\n",
        "name = \"app\"\nalgorithm = \"round_robin\"\nretries = 0\n",
    );
    let cfg = check(&text).expect("valid");
    assert_eq!(cfg.pools[0].algorithm, Algorithm::RoundRobin);
    assert_eq!(cfg.pools[0].retries, 0);
    let text = MINIMAL.replace(
        "name = \"app\"\n",
        "name = \"app\"\nalgorithm = \"fastest\"\n",
    );
    assert!(
        check(&text)
            .unwrap_err()
            .contains("unknown algorithm \"fastest\"")
    );
}

#[test]
fn proxy_protocol_keys_are_read_and_checked() {
    let with =
        |keys: &str| MINIMAL.replace("pool = \"app\"\n", &format!("pool = \"app\"\n{keys}\n"));
    let cfg = check(&with(
        "proxy_protocol = \"v2\"\nproxy_protocol_from = [\"10.0.0.0/8\", \"192.0.2.7\", \"::1\"]",
    ))
    .expect("valid");
    let pp = cfg.listeners[0].proxy_protocol.as_ref().expect("on");
    assert_eq!(pp.accept, ProxyAccept::V2);
    assert!(pp.allows("10.1.2.3".parse().expect("ip")));
    assert!(pp.allows("192.0.2.7".parse().expect("ip")));
    assert!(
        pp.allows("::ffff:10.0.0.1".parse().expect("mapped")),
        "IPv4-mapped peers"
    );
    assert!(!pp.allows("192.0.2.8".parse().expect("ip")));
    assert!(
        check(MINIMAL).expect("valid").listeners[0]
            .proxy_protocol
            .is_none()
    );
    assert_eq!(
        check(&with("proxy_protocol = \"v3\"")).unwrap_err(),
        "sluice.toml:5: listener \"listener1\": key \"proxy_protocol\": \"v3\": expected \"off\", \"v1\", \"v2\" or \"any\""
    );
    let e = check(&with("proxy_protocol = \"any\"")).unwrap_err();
    assert!(
        e.contains("proxy_protocol needs proxy_protocol_from"),
        "{e}"
    );
    let e = check(&with(
        "proxy_protocol = \"v1\"\nproxy_protocol_from = [\"10.0.0.0/33\"]",
    ))
    .unwrap_err();
    assert!(
        e.contains("\"10.0.0.0/33\" is not an address or a network"),
        "{e}"
    );
    let e = check(&with("proxy_protocol = \"v2\"\nproxy_protocol_from = []")).unwrap_err();
    assert!(e.contains("is empty"), "{e}");
    let e = check(&with("proxy_protocol_from = [\"10.0.0.0/8\"]")).unwrap_err();
    assert!(e.contains("set without proxy_protocol"), "{e}");

    let pool =
        |keys: &str| MINIMAL.replace("name = \"app\"\n", &format!("name = \"app\"\n{keys}\n"));
    let cfg = check(&pool("send_proxy_protocol = \"v1\"")).expect("valid");
    assert_eq!(cfg.pools[0].send_proxy_protocol, Some(ProxyVersion::V1));
    let e = check(&pool("send_proxy_protocol = \"any\"")).unwrap_err();
    assert!(e.contains("expected \"off\", \"v1\" or \"v2\""), "{e}");
}

#[test]
fn request_head_limits_have_defaults_and_bounds() {
    let cfg = check(MINIMAL).expect("valid");
    assert_eq!(
        (
            cfg.listeners[0].max_header_size,
            cfg.listeners[0].max_uri_length
        ),
        (32768, 8192)
    );
    let text = MINIMAL.replace(
        "pool = \"app\"\n",
        "pool = \"app\"\nmax_header_size = 100\n",
    );
    let e = check(&text).unwrap_err();
    assert!(e.contains("max_header_size"), "{e}");
}

#[test]
fn tcp_keepalive_and_ws_ping_are_read_and_checked() {
    let cfg = check(MINIMAL).expect("valid");
    assert_eq!(
        cfg.listeners[0].tcp_keepalive,
        Some(TcpKeepalive::default())
    );
    assert_eq!(cfg.pools[0].tcp_keepalive, Some(TcpKeepalive::default()));
    assert_eq!(cfg.listeners[0].ws_ping_interval, None);
    let text = MINIMAL
        .replace(
            "pool = \"app\"\n",
            "pool = \"app\"\ntcp_keepalive = { idle = \"30s\", count = 3 }\nws_ping_interval = \"20s\"\n",
        )
        .replace(
            "name = \"app\"\n",
            "name = \"app\"\ntcp_keepalive = { enabled = false }\n",
        );
    let cfg = check(&text).expect("valid");
    assert_eq!(
        cfg.listeners[0].tcp_keepalive,
        Some(TcpKeepalive {
            idle: Duration::from_secs(30),
            interval: Duration::from_secs(10),
            count: 3,
        })
    );
    assert_eq!(
        cfg.listeners[0].ws_ping_interval,
        Some(Duration::from_secs(20))
    );
    assert_eq!(cfg.pools[0].tcp_keepalive, None);
    let text = MINIMAL.replace(
        "pool = \"app\"\n",
        "pool = \"app\"\ntcp_keepalive = { interval = \"500ms\" }\n",
    );
    let err = check(&text).unwrap_err();
    assert!(
        err.starts_with("sluice.toml:5: listener \"listener1\" tcp_keepalive: key \"interval\": 500ms is out of range 1s..="),
        "{err}"
    );
}
