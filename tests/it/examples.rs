//! The shipped examples, run as a user runs them.

use std::path::Path;
use std::time::Duration;

use crate::support::*;

/// `examples/resend` (Node.js, the `ws` package from npm): 20 clients that
/// resend what was not acknowledged lose nothing while sluice drains two
/// backends in turn, although the backends answer one message at a time
/// 50–150 ms late while the clients send every 50 ms, so that every close
/// catches messages in flight (with the resend loop taken out, one try with
/// 80 messages per client lost 393 of 1,600). `.ci/run` installs Node.js and
/// the example's packages and sets SLUICE_REQUIRE_NODE, so there this test
/// cannot be skipped.
#[tokio::test]
async fn the_resend_example_loses_nothing_across_drains() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/resend");
    let ready = dir.join("node_modules/ws").exists()
        && std::process::Command::new("node")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !tool_present(
        ready,
        "SLUICE_REQUIRE_NODE",
        "needs node and `npm ci --prefix examples/resend`",
    ) {
        return;
    }
    let backends = echo_backends(3).await;
    for b in &backends {
        b.set_reply_delay(Duration::from_millis(50), Duration::from_millis(150));
    }
    let mut cfg = config(&backends.iter().map(|b| b.addr).collect::<Vec<_>>());
    cfg.pools[0].drain.window = Duration::from_secs(1);
    cfg.pools[0].rebalance.enabled = false;
    let sluice = Sluice::with_config(cfg).await;
    let client = tokio::process::Command::new("node")
        .current_dir(&dir)
        .args(["client.mjs", "--url", &sluice.url("/ws")])
        .args(["--clients", "20", "--messages", "40", "--every", "50"])
        .args(["--timeout", "60"])
        .kill_on_drop(true)
        .output();
    let client = tokio::spawn(client);
    eventually(30, "every client connected", || {
        backends.iter().map(|b| b.ws_open()).sum::<usize>() == 20
    })
    .await;
    let admin = sluice.admin();
    for name in ["b1", "b2"] {
        admin.drain("app", name, None).await.expect("drain");
        sluice
            .wait_backend_state(20, name, sluice::admin::api::BackendState::Drained)
            .await;
        admin.undrain("app", name).await.expect("undrain");
    }
    let out = within(90, "the example ends", client)
        .await
        .expect("joins")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| -> u64 {
        stdout
            .split(", ")
            .find_map(|f| f.trim().strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {stdout}"))
    };
    assert_eq!(field("lost"), 0, "{stdout}");
    assert_eq!(field("acknowledged"), 20 * 40, "{stdout}");
    assert!(
        field("reconnects") > 0,
        "the drains closed clients: {stdout}"
    );
    assert!(stdout.contains("\"1012\":"), "closed with 1012: {stdout}");
    eprintln!("resend example: {stdout}");
    // The drains caught messages in flight: resending is what saved them.
    assert!(field("resent") > 0, "{stdout}");
}
