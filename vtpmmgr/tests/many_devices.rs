//! One manager, many vTPM domains: `vtpmmgr serve --xen` in its own unprivileged domain of the
//! simulated Xen, whose xenstored holds every connection to C xenstored's default quota of 128
//! watches, serves 1,000 devices (250 domains with 4 each) on a bounded number of threads with
//! a constant number of watches, and never wakes while they are idle.

mod common;

use std::time::{Duration, Instant};

use xvtpm_frontend::{Frontend, FrontendConfig};
use xvtpm_proto::mgr::Request;
use xvtpm_xen::sim::{toolstack, SimHost};
use xvtpm_xen::Xen;

/// The manager's domain.
const MGR: u16 = 1;
/// Domains 2..2+DOMAINS, each with HANDLES devices.
const DOMAINS: u16 = 250;
const HANDLES: u32 = 4;

/// The names of the process's threads.
fn threads(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|t| std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim().to_string())
        .collect()
}

#[test]
fn a_manager_in_its_own_domain_serves_1000_devices_on_few_threads_and_sleeps_at_rest() {
    let dir = common::tmpdir("many-devices");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let store = dir.join("store.img");
    common::init_store(&store, &hw, "0");
    let host = SimHost::temp().expect("sim");
    let xs = host.xen(0).xenstore().expect("xs");
    toolstack::init_dom0(&xs).expect("dom0");
    toolstack::add_domain(&xs, MGR, "vtpmmgr").expect("manager domain");
    let log = dir.join("mgr.log");
    let mgr = common::serve_xen(&store, &hw, host.dir(), MGR, &log);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let request = Request::GetBootHash.encode();
    let start = Instant::now();
    let mut devices = Vec::new();
    for d in 2..2 + DOMAINS {
        toolstack::add_domain(&xs, d, &format!("vtpm-{d}")).expect("domain");
        for h in 0..HANDLES {
            toolstack::add_vtpm(&xs, d, MGR, h, &format!("1d1e0000-0000-4000-8000-{d:08}{h:04}")).expect("device");
            let cfg = FrontendConfig { handle: h, ..FrontendConfig::default() };
            let mut fe = Frontend::connect(&host.xen(d), cfg)
                .unwrap_or_else(|e| panic!("device {d}/{h} connects: {e}\n{}", log_text()));
            let rsp = fe.transmit(&request).expect("an answer");
            assert!(rsp.len() >= 10, "{rsp:02x?}");
            devices.push(fe);
        }
    }
    let pid = mgr.0.id();
    let names = threads(pid);
    let n = names.len();
    eprintln!(
        "{} devices connected and answered in {:?}; the manager's threads: {names:?}",
        devices.len(),
        start.elapsed()
    );
    assert!(n <= 12, "{n} threads for {} devices: {names:?}", devices.len());
    assert!(!log_text().contains("cannot watch"), "{}", log_text());

    std::thread::sleep(Duration::from_millis(500));
    let (before, threads_before) = xvtpm_tests::procstat::wakeups(pid);
    std::thread::sleep(Duration::from_secs(5));
    let (after, threads_after) = xvtpm_tests::procstat::wakeups(pid);
    assert_eq!(
        after - before,
        0,
        "the idle manager woke; per thread before {threads_before:?}, after {threads_after:?}"
    );

    // Every device is still served, and one closing is noticed through the one watch.
    for fe in devices.iter_mut().step_by(97) {
        assert!(fe.transmit(&request).expect("an answer after idling").len() >= 10);
    }
    let last = devices.pop().expect("devices");
    last.close().expect("close");
    let end = Instant::now() + Duration::from_secs(10);
    while !log_text().contains(&format!("vtpm {}/{}: disconnected", 1 + DOMAINS, HANDLES - 1)) {
        assert!(Instant::now() < end, "the closing frontend was not seen: {}", log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}
