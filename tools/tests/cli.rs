//! The operator tool's tpmif diagnostics, run as processes on the simulated Xen.

use std::process::{Command, Stdio};
use std::time::Duration;

use xvtpm_xen::sim::{toolstack, SimHost};
use xvtpm_xen::{Xen, XenbusState};

const XVTPM: &str = env!("CARGO_BIN_EXE_xvtpm");

#[test]
fn echo_backend_and_ping_over_the_simulated_xen() {
    let host = SimHost::temp().expect("sim");
    let xs = host.xen(0).xenstore().expect("xs");
    let dir = host.dir().to_str().expect("utf-8 dir").to_string();
    let mut backend = Command::new(XVTPM)
        .args(["echo-backend", "--sim", &dir, "--domid", "0"])
        .stderr(Stdio::null())
        .spawn()
        .expect("backend");
    // Like libxl, create the guest once the backend watches (it answers within 10 s).
    toolstack::add_domain(&xs, 4, "guest").expect("domain");
    toolstack::add_vtpm(&xs, 4, 0, 0, "11111111-2222-4333-8444-555555555555").expect("vtpm");
    let ok = toolstack::wait_for_state(
        &xs,
        "/local/domain/0/backend/vtpm/4/0/state",
        XenbusState::InitWait,
        Duration::from_secs(10),
    );
    let out =
        Command::new(XVTPM).args(["ping", "--sim", &dir, "--domid", "4", "--count", "200"]).output().expect("ping");
    let _ = backend.kill();
    let _ = backend.wait();
    assert!(ok, "echo backend reached InitWait");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ping failed: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("200 round trips on device 0: median"), "{stdout}");
}

#[test]
fn without_xen_the_tool_says_so() {
    if std::path::Path::new("/dev/xen").exists() {
        return;
    }
    let out = Command::new(XVTPM).args(["ping", "--count", "1"]).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach Xen") && err.contains("/dev/xen/xenbus"), "{err}");
}
