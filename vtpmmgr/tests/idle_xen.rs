//! The manager's Xen transport at rest: `vtpmmgr serve --xen` on the simulated Xen with 100
//! connected vTPM devices (as 100 vTPM domains would hold) never wakes while no request comes.

mod common;

use std::time::Duration;

use xvtpm_frontend::{Frontend, FrontendConfig};
use xvtpm_proto::mgr::Request;
use xvtpm_xen::sim::{toolstack, SimHost};
use xvtpm_xen::Xen;

/// (`many_devices.rs` runs 1,000, in an unprivileged domain.)
const DEVICES: u16 = 100;

#[test]
fn a_manager_with_100_connected_devices_never_wakes_at_rest() {
    let dir = common::tmpdir("idle-xen");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let store = dir.join("store.img");
    common::init_store(&store, &hw, "0");
    let host = SimHost::temp().expect("sim");
    let log = dir.join("mgr.log");
    let mgr = common::serve_xen(&store, &hw, host.dir(), 0, &log);
    let xs = host.xen(0).xenstore().expect("xs");
    let request = Request::GetBootHash.encode();
    let mut devices = Vec::new();
    for d in 10..10 + DEVICES {
        toolstack::add_domain(&xs, d, &format!("vtpm-{d}")).expect("domain");
        toolstack::add_vtpm(&xs, d, 0, 0, &format!("1d1e0000-0000-4000-8000-{d:012}")).expect("device");
        let mut fe = Frontend::connect(&host.xen(d), FrontendConfig::default()).expect("device connects");
        let rsp = fe.transmit(&request).expect("an answer");
        assert!(rsp.len() >= 10, "{rsp:02x?}");
        devices.push(fe);
    }
    std::thread::sleep(Duration::from_millis(500));
    let pid = mgr.0.id();
    let (before, threads_before) = xvtpm_tests::procstat::wakeups(pid);
    std::thread::sleep(Duration::from_secs(5));
    let (after, threads_after) = xvtpm_tests::procstat::wakeups(pid);
    assert_eq!(
        after - before,
        0,
        "the idle manager woke up; per thread before {threads_before:?}, after {threads_after:?}"
    );
    // Idle is not dead: the last device is still answered.
    let last = devices.last_mut().expect("devices");
    assert!(last.transmit(&request).expect("answer after idling").len() >= 10);
    assert!(!std::fs::read_to_string(&log).unwrap_or_default().contains("cannot watch"));
}
