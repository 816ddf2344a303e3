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
        (
            "examples/acme.toml",
            include_str!("../../examples/acme.toml"),
        ),
        (
            "examples/logging.toml",
            include_str!("../../examples/logging.toml"),
        ),
        (
            "examples/cluster.toml",
            include_str!("../../examples/cluster.toml"),
        ),
    ] {
        if let Err(e) = parse(text, Path::new(name)) {
            panic!("{e}");
        }
    }
}

#[test]
fn cluster_settings_and_their_errors() {
    let with = |cluster: &str| format!("[cluster]\n{cluster}\n{MINIMAL}");
    assert_eq!(check(MINIMAL).expect("valid").cluster, None);
    let cfg = check(&with(
        "redis = \"redis://127.0.0.1:6379\"\ninstance = \"lb-1\"\npublish_interval = \"500ms\"",
    ))
    .expect("valid");
    let cluster = cfg.cluster.expect("cluster");
    assert_eq!(cluster.instance, "lb-1");
    assert_eq!(cluster.publish_interval, Duration::from_millis(500));
    assert_eq!(cluster.ttl(), Duration::from_millis(1500));
    let cfg = check(&with("redis = \"rediss://redis.example:6380\"")).expect("valid");
    assert!(
        !cfg.cluster.expect("cluster").instance.is_empty(),
        "host name"
    );
    assert_eq!(
        check(&with("redis = \"http://127.0.0.1:6379\"")).expect_err("scheme"),
        "sluice.toml:2: cluster: key \"redis\": \"http://127.0.0.1:6379\": expected a redis:// or rediss:// URL, e.g. \"redis://127.0.0.1:6379\""
    );
    assert_eq!(
        check(&with("redis = \"redis://x\"\ninstance = \"lb 1\"")).expect_err("name"),
        "sluice.toml:3: cluster: key \"instance\": instance name \"lb 1\" may hold only letters, digits, . _ - (64 at most)"
    );
    assert_eq!(
        check(&with("instance = \"lb-1\"")).expect_err("no redis"),
        "sluice.toml:1: cluster: missing key \"redis\""
    );
    let sticky = MINIMAL.replace("name = \"app\"\n", "name = \"app\"\nsticky = {}\n");
    let err = check(&format!("[cluster]\nredis = \"redis://x\"\n{sticky}")).expect_err("no key");
    assert!(
        err.contains(
            "cluster mode needs secret_file: every instance must sign pins with the same key"
        ),
        "{err}"
    );
}

#[test]
fn log_settings_and_their_errors() {
    let with = |log: &str| format!("[log]\n{log}\n{MINIMAL}");
    let cfg = check(MINIMAL).expect("valid");
    assert_eq!(cfg.log, LogConfig::default());
    let cfg = check(&with(
        "format = \"json\"\naccess = \"stdout\"\naccess_queue = 10",
    ))
    .expect("valid");
    assert_eq!(
        cfg.log,
        LogConfig {
            format: LogFormat::Json,
            access: AccessTarget::Stdout,
            access_queue: 10,
        }
    );
    let cfg = check(&with("access = \"logs.d/../access.log\"")).expect_err("no such folder");
    assert_eq!(
        cfg,
        "sluice.toml:2: log: key \"access\": folder logs.d/.. does not exist"
    );
    let cfg = check(&with("access = \"access.log\"")).expect("valid");
    assert_eq!(cfg.log.access, AccessTarget::File("access.log".into()));
    assert_eq!(
        check(&with("format = \"xml\"")).expect_err("bad format"),
        "sluice.toml:2: log: key \"format\": \"xml\": expected \"text\" or \"json\""
    );
    assert_eq!(
        check(&with("access = \"\"")).expect_err("empty"),
        "sluice.toml:2: log: key \"access\": expected \"stdout\", \"stderr\", \"off\" or a file path"
    );
    assert_eq!(
        check(&with("acess = \"stdout\"")).expect_err("typo"),
        "sluice.toml:2: log: unknown key \"acess\""
    );
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
    let cfg = check(&with(
        "algorithm = \"hash\"\nkey = \"ip\"\nhash_balance_factor = 1.25",
    ))
    .expect("valid");
    assert_eq!(cfg.pools[0].hash_balance_factor, Some(1.25));
    assert!(
        check(&with("hash_balance_factor = 1.25"))
            .unwrap_err()
            .contains("key \"hash_balance_factor\": only used with algorithm = \"hash\"")
    );
    assert!(
        check(&with(
            "algorithm = \"hash\"\nkey = \"ip\"\nhash_balance_factor = 0.5"
        ))
        .unwrap_err()
        .contains("out of range 1..=100")
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
fn an_error_at_the_end_of_the_file_names_its_last_line() {
    let err = check("a = 1\nb = \"\"\"\n").unwrap_err();
    assert!(err.starts_with("sluice.toml:2:"), "{err}");
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

/// Fuzz-style: whatever text `parse` is given, it answers, and an error
/// names the file and a line of it. Long runs: see README ("Tests").
mod any_text {
    use std::collections::HashSet;
    use std::net::SocketAddr;

    use proptest::prelude::*;
    use proptest::sample::Index;
    use toml::de::{DeTable, DeValue};

    use super::*;

    const EXAMPLE: &str = include_str!("../../examples/sluice.toml");

    /// A path whose folder does not exist (files the text names are not
    /// found), with a space, so that the message must name it whole.
    const PATH: &str = "fuzz conf.d/sluice.toml";

    fn cases() -> u32 {
        std::env::var("SLUICE_PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256)
    }

    /// True when the text holds a string `host:port` whose host the
    /// standard library would look up (sluice resolves `bind` and
    /// `address` at load): such inputs are not parsed, so that a fuzz run
    /// sends no DNS queries. Mirrors `impl ToSocketAddrs for str`.
    fn would_look_up_a_name(text: &str) -> bool {
        fn value(v: &DeValue<'_>) -> bool {
            match v {
                DeValue::String(s) => {
                    s.parse::<SocketAddr>().is_err()
                        && s.rsplit_once(':')
                            .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
                }
                DeValue::Array(items) => items.iter().any(|v| value(v.get_ref())),
                DeValue::Table(t) => table(t),
                _ => false,
            }
        }
        fn table(t: &DeTable<'_>) -> bool {
            t.iter().any(|(_, v)| value(v.get_ref()))
        }
        DeTable::parse(text).is_ok_and(|doc| table(doc.get_ref()))
    }

    /// What `parse` promises for any text: a `Config` whose indices and
    /// lists hold, or an `Invalid` error (it reads no config file, so
    /// never `Read`) naming `PATH` and a line of the text, and displayed
    /// as `PATH:LINE: [CONTEXT: ]MESSAGE`. The line is the one holding
    /// the offset the error is at, from 1 to the number of newlines + 1:
    /// an error at the very end of a text that ends with a newline (an
    /// unclosed `"""`) names the empty line after its last newline.
    fn check_answer(text: &str) -> Result<(), TestCaseError> {
        if would_look_up_a_name(text) {
            return Ok(());
        }
        let path = Path::new(PATH);
        let lines = text.split('\n').count();
        match parse(text, path) {
            Ok(cfg) => {
                prop_assert!(!cfg.listeners.is_empty() && !cfg.pools.is_empty());
                let mut names = HashSet::new();
                for l in &cfg.listeners {
                    prop_assert!(
                        l.pool < cfg.pools.len(),
                        "listener {} pool {}",
                        l.name,
                        l.pool
                    );
                    prop_assert!(names.insert(&l.name), "listener {} twice", l.name);
                    prop_assert!(l.header_read_timeout <= MAX_DURATION);
                    prop_assert!(l.body_timeout <= MAX_DURATION);
                }
                let mut names = HashSet::new();
                for p in &cfg.pools {
                    prop_assert!(names.insert(&p.name), "pool {} twice", p.name);
                    prop_assert!(!p.backends.is_empty(), "pool {} without backends", p.name);
                    let mut backends = HashSet::new();
                    for b in &p.backends {
                        prop_assert!(backends.insert(&b.name), "backend {} twice", b.name);
                        prop_assert!((1..=10_000).contains(&b.weight));
                    }
                    for d in [
                        p.connect_timeout,
                        p.response_timeout,
                        p.keepalive_timeout,
                        p.slow_start,
                        p.drain.window,
                        p.drain.close_timeout,
                        p.rebalance.interval,
                        p.passive.ejection_time,
                        p.admission.queue_timeout,
                    ] {
                        prop_assert!(d <= MAX_DURATION, "pool {}: {:?}", p.name, d);
                    }
                }
                prop_assert!(cfg.shutdown_timeout <= MAX_DURATION);
            }
            Err(e @ ConfigError::Read { .. }) => {
                prop_assert!(false, "parse read a file: {}", e);
            }
            Err(e) => {
                let shown = e.to_string();
                let ConfigError::Invalid {
                    path: named,
                    line,
                    context,
                    message,
                } = e
                else {
                    unreachable!("Read is handled above");
                };
                prop_assert_eq!(named.as_path(), path);
                prop_assert!(
                    (1..=lines).contains(&line),
                    "line {} of a text of {} lines: {}",
                    line,
                    lines,
                    shown
                );
                prop_assert!(!message.is_empty(), "{}", shown);
                let context = if context.is_empty() {
                    String::new()
                } else {
                    format!("{context}: ")
                };
                prop_assert_eq!(shown, format!("{PATH}:{line}: {context}{message}"));
            }
        }
        Ok(())
    }

    /// TOML-ish pieces, so that arbitrary text also gets past the TOML
    /// parser now and then.
    fn toml_soup() -> impl Strategy<Value = String> {
        let token = prop_oneof![
            Just("[[pool]]\n".to_string()),
            Just("[[pool.backend]]\n".to_string()),
            Just("[[listener]]\n".to_string()),
            Just("[[listener.tls.sni]]\n".to_string()),
            Just("[admin]\n".to_string()),
            Just("name = \"app\"\n".to_string()),
            Just("name = \"b\"\n".to_string()),
            Just("pool = \"app\"\n".to_string()),
            Just("bind = \"127.0.0.1:0\"\n".to_string()),
            Just("address = \"127.0.0.1:1\"\n".to_string()),
            Just("drain = { window = \"1s\" }\n".to_string()),
            prop::sample::select(vec![
                "=", "\"", "'", "\"\"\"", "{", "}", "[", "]", ",", ".", "\n", "\r\n", " ", "#",
                "\\", "\\u", "1", "-", "+", "x", "name", "tls", "health", "true", "1e9", "\0",
            ])
            .prop_map(str::to_string),
            any::<char>().prop_map(String::from),
        ];
        proptest::collection::vec(token, 0..60).prop_map(|v| v.concat())
    }

    /// A value for a key: numbers (huge, negative, odd radixes), durations
    /// (huge, tiny, malformed), strings (random, non-ASCII, addresses,
    /// names that clash), other TOML types, and plain garbage.
    fn value() -> impl Strategy<Value = String> {
        let units = prop::sample::select(vec![
            "", "ns", "us", "ms", "s", "m", "h", "d", "w", "M", "y", "days", "years", "parsec",
        ]);
        prop_oneof![
            1 => any::<i64>().prop_map(|n| n.to_string()),
            1 => any::<u64>().prop_map(|n| n.to_string()),
            1 => any::<f64>().prop_map(|f| f.to_string()),
            4 => prop::sample::select(vec![
                "0", "-0", "+1", "0x7fffffffffffffff", "0o777", "0b101", "1_000", "1e400",
                "nan", "-inf", "1.5", "true", "false", "[]", "[1, \"a\"]", "{}", "{ x = 1 }",
                "1979-05-27T07:32:00Z", "\"\"", "\"127.0.0.1:0\"", "\"[::1]:65535\"",
                "\"127.0.0.1:99999\"", "\"0.0.0.0:80\"", "\"app\"", "\"app-1\"", "\"public\"",
                "\"hash\"", "\"v2\"", "\"none\"", "\"/health\"", "\"295000000000y\"",
                "\"18446744073709551615s\"", "\"30days 1s\"", "\"1ns\"", "\"0s\"", "\"-5s\"",
                "\"1h 30m\"", "\"5\"", "\"\\u0000\"", "'literal'", "\"\"\"multi\nline\"\"\"",
            ])
            .prop_map(str::to_string),
            2 => (any::<u64>(), units.clone()).prop_map(|(n, u)| format!("\"{n}{u}\"")),
            2 => (0u64..100_000, units).prop_map(|(n, u)| format!("\"{n}{u}\"")),
            // Strings without a colon: no host:port to look up.
            2 => "[^\"\\\\:\n]{0,40}".prop_map(|s| format!("\"{s}\"")),
            1 => any::<String>(),
        ]
    }

    /// One change to the lines of the example.
    #[derive(Debug, Clone)]
    enum Mutation {
        Delete(Index),
        Duplicate(Index),
        Swap(Index, Index),
        /// Replaces the value after the n-th `=` of a line (up to a `,`,
        /// `}` or `#`), so inside inline tables too.
        Value(Index, Index, String),
        /// Turns a commented-out key (`# token_file = ...`) on.
        Uncomment(Index),
        /// Inserts text at a character of a line.
        Insert(Index, Index, String),
        /// Inserts a new line.
        Line(Index, String),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        let bytes = proptest::collection::vec(any::<u8>(), 1..8)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned());
        let line = prop_oneof![
            toml_soup(),
            (
                prop::sample::select(vec![
                    "name",
                    "bind",
                    "pool",
                    "address",
                    "weight",
                    "tls",
                    "key",
                    "algorithm",
                    "sticky",
                    "token_file",
                    "enabled",
                    "health",
                    "drain",
                    "proxy_protocol",
                    "proxy_protocol_from",
                    "send_proxy_protocol",
                    "x",
                ]),
                value(),
            )
                .prop_map(|(k, v)| format!("{k} = {v}")),
        ];
        prop_oneof![
            1 => any::<Index>().prop_map(Mutation::Delete),
            1 => any::<Index>().prop_map(Mutation::Duplicate),
            1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
            4 => (any::<Index>(), any::<Index>(), value())
                .prop_map(|(l, n, v)| Mutation::Value(l, n, v)),
            1 => any::<Index>().prop_map(Mutation::Uncomment),
            1 => (any::<Index>(), any::<Index>(), prop_oneof![bytes, any::<String>()])
                .prop_map(|(l, at, s)| Mutation::Insert(l, at, s)),
            1 => (any::<Index>(), line).prop_map(|(l, s)| Mutation::Line(l, s)),
        ]
    }

    fn apply(lines: &mut Vec<String>, m: &Mutation) {
        if lines.is_empty() {
            lines.push(String::new());
        }
        let n = lines.len();
        match m {
            Mutation::Delete(i) => {
                lines.remove(i.index(n));
            }
            Mutation::Duplicate(i) => {
                let i = i.index(n);
                lines.insert(i, lines[i].clone());
            }
            Mutation::Swap(a, b) => lines.swap(a.index(n), b.index(n)),
            Mutation::Value(i, nth, v) => {
                let line = &mut lines[i.index(n)];
                let eqs: Vec<usize> = line.match_indices('=').map(|(at, _)| at).collect();
                if eqs.is_empty() {
                    return;
                }
                let start = eqs[nth.index(eqs.len())] + 1;
                let end = line[start..]
                    .find([',', '}', '#'])
                    .map_or(line.len(), |k| start + k);
                line.replace_range(start..end, &format!(" {v} "));
            }
            Mutation::Uncomment(i) => {
                let line = &mut lines[i.index(n)];
                if let Some(rest) = line.trim_start().strip_prefix('#') {
                    *line = rest.trim_start().to_string();
                }
            }
            Mutation::Insert(i, at, s) => {
                let line = &mut lines[i.index(n)];
                let chars = line.char_indices().map(|(k, _)| k).chain([line.len()]);
                let at = chars.collect::<Vec<_>>()[at.index(line.chars().count() + 1)];
                line.insert_str(at, s);
            }
            Mutation::Line(i, s) => lines.insert(i.index(n + 1), s.clone()),
        }
    }

    fn mutated_example() -> impl Strategy<Value = String> {
        proptest::collection::vec(mutation(), 1..5).prop_map(|ms| {
            let mut lines: Vec<String> = EXAMPLE.split('\n').map(str::to_string).collect();
            for m in &ms {
                apply(&mut lines, m);
            }
            lines.join("\n")
        })
    }

    #[test]
    fn the_example_is_valid_and_looks_up_no_name() {
        assert!(!would_look_up_a_name(EXAMPLE));
        assert!(would_look_up_a_name("address = \"backend.internal:80\""));
        assert!(parse(EXAMPLE, Path::new(PATH)).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]

        /// Arbitrary text, and TOML-ish soup: an answer, never a panic.
        #[test]
        fn any_text_is_answered_with_a_line_of_it(
            text in prop_oneof![any::<String>(), toml_soup()],
        ) {
            check_answer(&text)?;
        }

        /// The shipped example with lines deleted, duplicated, swapped,
        /// inserted, uncommented, values replaced (inside inline tables
        /// too) and random text inserted: an answer, never a panic.
        #[test]
        fn any_mutation_of_the_example_is_answered_with_a_line_of_it(
            text in mutated_example(),
        ) {
            check_answer(&text)?;
        }
    }
}

#[test]
fn acme_sections_are_checked_without_contacting_the_ca() {
    let with = |acme: &str| {
        MINIMAL.replace(
            "pool = \"app\"\n",
            &format!("pool = \"app\"\n[listener.tls]\nacme = {{ {acme} }}\n"),
        )
    };
    let dir = std::env::temp_dir().join("sluice-acme-check");
    let good = format!(
        "domains = [\"chat.example.com\"], contact = \"mailto:ops@example.com\", \
         directory = \"https://acme.example/dir\", cache = \"{}\"",
        dir.display()
    );
    let cfg = check(&with(&good)).expect("valid");
    let tls = cfg.listeners[0].tls.as_ref().expect("tls");
    assert_eq!(tls.acme[0].contact, ["mailto:ops@example.com"]);
    assert_eq!(tls.acme[0].challenge, AcmeChallenge::TlsAlpn01);
    assert_eq!(tls.default, tls.acme[0].files());
    for (bad, says) in [
        (
            good.replace("https://acme.example/dir", "http://acme.example/dir"),
            "key \"directory\": an https:// URL is needed",
        ),
        (
            good.replace("chat.example.com", "*.example.com"),
            "key \"domains\": DNS names are needed",
        ),
        (
            good.replace("mailto:ops@example.com", "ops@example.com"),
            "key \"contact\"",
        ),
        (
            format!("{good}, challenge = \"dns-01\""),
            "key \"challenge\"",
        ),
        (
            good.replace(
                &dir.display().to_string(),
                concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml/acme"),
            ),
            "key \"cache\": ",
        ),
        (format!("{good}, colour = 1"), "colour"),
        (
            format!("{good}, challenge = \"http-01\""),
            "key \"challenge\": \"http-01\" is answered on a plain (non-TLS) listener",
        ),
        (
            format!("{good}, fallback_key = \"a.key\""),
            "key \"fallback_cert\": fallback_cert and fallback_key go together",
        ),
        (
            format!("{good}, fallback_cert = \"none.pem\", fallback_key = \"none.key\""),
            "key \"fallback_cert\": reading ",
        ),
    ] {
        let err = check(&with(&bad)).expect_err(&bad);
        assert!(
            err.contains("sluice.toml:") && err.contains(says),
            "{bad}: {err}"
        );
    }
    // HTTP-01 is answered on a plain listener, which the CA reaches.
    let http01 = format!(
        "{}\n[[listener]]\nname = \"plain\"\nbind = \"127.0.0.1:8081\"\npool = \"app\"\n",
        with(&format!("{good}, challenge = \"http-01\""))
    );
    let cfg = check(&http01).expect("http-01 with a plain listener");
    // One behind the PROXY protocol cannot be reached by the CA.
    let behind = http01.replace(
        "name = \"plain\"\n",
        "name = \"plain\"\nproxy_protocol = \"v2\"\nproxy_protocol_from = [\"10.0.0.0/8\"]\n",
    );
    assert!(
        check(&behind)
            .expect_err("only behind the PROXY protocol")
            .contains("without proxy_protocol"),
    );
    let tls = cfg.listeners[0].tls.as_ref().expect("tls");
    assert_eq!(tls.acme[0].challenge, AcmeChallenge::Http01);
    let both = MINIMAL.replace(
        "pool = \"app\"\n",
        &format!("pool = \"app\"\n[listener.tls]\ncert = \"a.pem\"\nkey = \"a.key\"\nacme = {{ {good} }}\n"),
    );
    assert!(
        check(&both)
            .expect_err("both")
            .contains("either cert and key, or acme")
    );
}

#[test]
fn http2_settings_are_read_and_checked() {
    let with =
        |keys: &str| MINIMAL.replace("pool = \"app\"\n", &format!("pool = \"app\"\n{keys}\n"));
    let cfg = check(MINIMAL).expect("valid");
    assert!(
        !cfg.listeners[0].http2(),
        "off on a plain listener by default"
    );
    let cfg = check(&with(
        "http2 = true\nhttp2_max_concurrent_streams = 50\nhttp2_stream_window = 65535\n\
         http2_connection_window = 1048576\nhttp2_idle_timeout = \"5s\"",
    ))
    .expect("valid");
    let h2 = cfg.listeners[0].http2;
    assert!(cfg.listeners[0].http2());
    assert_eq!(
        (
            h2.max_concurrent_streams,
            h2.stream_window,
            h2.connection_window
        ),
        (50, 65_535, 1 << 20)
    );
    assert_eq!(h2.idle_timeout, std::time::Duration::from_secs(5));
    for (bad, says) in [
        ("http2 = \"yes\"", "key \"http2\""),
        (
            "http2_max_concurrent_streams = 0",
            "key \"http2_max_concurrent_streams\"",
        ),
        ("http2_stream_window = 1000", "key \"http2_stream_window\""),
        (
            "websocket_over_http2 = true",
            "websocket_over_http2 needs HTTP/2",
        ),
        (
            "http2_stream_window = 8388608",
            "http2_connection_window (4194304) is below http2_stream_window",
        ),
    ] {
        let err = check(&with(bad)).expect_err(bad);
        assert!(
            err.contains("sluice.toml:") && err.contains(says),
            "{bad}: {err}"
        );
    }
}
