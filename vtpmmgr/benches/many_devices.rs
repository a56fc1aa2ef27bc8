//! One manager, 10,000 vTPM devices: `vtpmmgr serve --xen` in an unprivileged domain of the
//! simulated Xen (its xenstored holds every connection to 128 watches), Debian's swtpm as the
//! hardware TPM, 10,000 provisioned vTPMs, 250 frontend domains with 40 devices each. Reports
//! how long the devices take to connect, the manager's threads and watches, its wake-ups at
//! rest, and LOADHASHKEY throughput through the Xen transport with 10,000 devices against 10
//! devices (same run) and against the in-process handler.
//!
//! Run: `cargo bench -p xvtpm-vtpmmgr --bench many_devices` (env `DOMAINS`, default 250;
//! `HANDLES` per domain, default 40).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use xvtpm_proto::mgr::{status, Request};
use xvtpm_vtpmmgr::dispatch::{self, Caller};
use xvtpm_vtpmmgr::manager::{InitConfig, Manager};
use xvtpm_vtpmmgr::store::dev::FileDev;
use xvtpm_xen::sim::{toolstack, SimHost};
use xvtpm_xen::tpmif::{Tpmif, TpmifState};
use xvtpm_xen::{EventChannel, Port, SharedPage, TxId, Xen, XenbusState};

const MGR: u16 = 1;

fn uuid(d: u16, h: u32) -> [u8; 16] {
    let mut u = [0x1d; 16];
    u[6] = 0x40;
    u[8] = 0x80;
    u[10..12].copy_from_slice(&d.to_be_bytes());
    u[12..].copy_from_slice(&h.to_be_bytes());
    u
}

/// A frontend without a thread or a xenstore connection of its own: its page and port.
struct Device {
    page: SharedPage,
    port: Port,
    domain: usize,
}

/// Sends LOADHASHKEY on `devices` in rounds of `in_flight`, `total` in all; requests per second.
fn load_rate(devices: &[Device], evtchns: &[Box<dyn EventChannel>], in_flight: usize, total: usize) -> f64 {
    let req = Request::LoadHashKey.encode();
    let start = Instant::now();
    let mut done = 0;
    let mut at = 0;
    let mut out = Vec::new();
    while done < total {
        let batch: Vec<&Device> = (0..in_flight).map(|i| &devices[(at + i) % devices.len()]).collect();
        at += in_flight;
        for d in &batch {
            let t = Tpmif::new(&d.page);
            t.write_request(0, &req).expect("request");
            t.set_state(TpmifState::Submit).expect("submit");
            evtchns[d.domain].notify(d.port).expect("notify");
        }
        for d in &batch {
            let t = Tpmif::new(&d.page);
            let end = Instant::now() + Duration::from_secs(30);
            while !matches!(t.state(), Ok(TpmifState::Finish)) {
                assert!(Instant::now() < end, "no answer");
                std::hint::spin_loop();
            }
            t.read_packet(&mut out).expect("response");
            assert_eq!(u32::from_be_bytes([out[6], out[7], out[8], out[9]]), status::SUCCESS);
            t.set_state(TpmifState::Idle).expect("idle");
            // Take the manager's notification, as a frontend does: the simulated event channel
            // holds a few undelivered ones per handle before its sender waits.
            let ev = &evtchns[d.domain];
            while let Some(p) = ev.wait(Some(Duration::ZERO)).expect("wait") {
                ev.unmask(p).expect("unmask");
            }
        }
        done += in_flight;
    }
    done as f64 / start.elapsed().as_secs_f64()
}

fn main() -> anyhow::Result<()> {
    let env = |k: &str, d: u32| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let domains = env("DOMAINS", 250) as u16;
    let handles = env("HANDLES", 40);
    let n = usize::from(domains) * handles as usize;
    let dir = common::tmpdir("many-bench");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let store = std::path::Path::new("/dev/shm").join(format!("xvtpm-many-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&store);

    // The store: every device's vTPM provisioned and saved once; then the in-process figure.
    let t = Instant::now();
    let in_process = {
        let cfg = InitConfig { pcrs: vec![0], ..InitConfig::default() };
        let mut m = Manager::init(FileDev::open(&store, true)?, hw.connect(), &cfg)?;
        m.set_counter_window(xvtpm_vtpmmgr::pace::COUNTER_WINDOW);
        for d in 2..2 + domains {
            for h in 0..handles {
                m.provision(uuid(d, h), 0, None)?;
                m.save(&uuid(d, h), &[h as u8; 52])?;
            }
        }
        let iters = 100_000u32;
        let req = Request::LoadHashKey.encode();
        let start = Instant::now();
        for i in 0..iters {
            let mut c = Caller::Vtpm(uuid(2 + (i % u32::from(domains)) as u16, i % handles));
            let r = dispatch::handle(&mut m, &mut c, None, &req);
            assert_eq!(u32::from_be_bytes([r[6], r[7], r[8], r[9]]), status::SUCCESS);
        }
        let rate = f64::from(iters) / start.elapsed().as_secs_f64();
        m.flush_counter(true)?;
        rate
    };
    println!("store: {n} vTPMs provisioned and saved in {:.1} s", t.elapsed().as_secs_f64());

    let host = SimHost::temp()?;
    let xs = host.xen(0).xenstore()?;
    toolstack::init_dom0(&xs)?;
    toolstack::add_domain(&xs, MGR, "vtpmmgr")?;
    let log = dir.join("mgr.log");
    let mgr = common::serve_xen(&store, &hw, host.dir(), MGR, &log);
    let pid = mgr.0.id();

    // The devices: per frontend domain one grant allocator and one event channel handle.
    let t = Instant::now();
    let mut evtchns = Vec::new();
    let mut devices = Vec::new();
    for (i, d) in (2..2 + domains).enumerate() {
        toolstack::add_domain(&xs, d, &format!("vtpm-{d}"))?;
        let xen = host.xen(d);
        let grants = xen.grant_allocator()?;
        let ev = xen.evtchn()?;
        for h in 0..handles {
            toolstack::add_vtpm(&xs, d, MGR, h, &xvtpm_proto::Uuid(uuid(d, h)).to_string())?;
            let page = grants.grant(MGR, true)?;
            let port = ev.alloc_unbound(MGR)?;
            let fe = xvtpm_xen::xenbus::vtpm_frontend_path(d, h);
            xs.transaction(|tx| {
                xs.write(tx, &format!("{fe}/ring-ref"), page.gref().to_string().as_bytes())?;
                xs.write(tx, &format!("{fe}/event-channel"), port.to_string().as_bytes())?;
                xs.write(tx, &format!("{fe}/feature-protocol-v2"), b"1")?;
                xs.write(tx, &format!("{fe}/state"), XenbusState::Initialised.as_str().as_bytes())
            })?;
            devices.push(Device { page, port, domain: i });
        }
        evtchns.push(ev);
    }
    for d in 2..2 + domains {
        for h in 0..handles {
            let be = xvtpm_xen::xenbus::vtpm_backend_path(MGR, d, h);
            let end = Instant::now() + Duration::from_secs(120);
            while xs.try_read(TxId::NONE, &format!("{be}/state"))?.as_deref() != Some(b"4") {
                anyhow::ensure!(Instant::now() < end, "{be} did not connect");
                std::thread::sleep(Duration::from_millis(5));
            }
            let fe = xvtpm_xen::xenbus::vtpm_frontend_path(d, h);
            xs.write(TxId::NONE, &format!("{fe}/state"), XenbusState::Connected.as_str().as_bytes())?;
        }
    }
    let connect = t.elapsed();
    println!("{n} devices connected in {:.1} s ({:.0}/s)", connect.as_secs_f64(), n as f64 / connect.as_secs_f64());
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))?.count();
    let log_text = std::fs::read_to_string(&log)?;
    println!(
        "manager: {threads} threads, 2 xenstore watches; \"cannot watch\" in its log: {}",
        log_text.contains("cannot watch")
    );

    std::thread::sleep(Duration::from_secs(1));
    let (before, _) = xvtpm_tests::procstat::wakeups(pid);
    std::thread::sleep(Duration::from_secs(10));
    let (after, _) = xvtpm_tests::procstat::wakeups(pid);
    println!("at rest with {n} devices connected: {:.1} wake-ups/s", (after - before) as f64 / 10.0);

    let total = 50_000;
    let few = load_rate(&devices[..10], &evtchns, 10, total);
    let all = load_rate(&devices, &evtchns, 10, total);
    let all_64 = load_rate(&devices, &evtchns, 64, total);
    println!("LOADHASHKEY in process: {in_process:.0}/s");
    println!("LOADHASHKEY over the Xen transport, 10 devices, 10 in flight: {few:.0}/s");
    println!(
        "LOADHASHKEY over the Xen transport, {n} devices, 10 in flight: {all:.0}/s ({:.2}x the 10-device figure)",
        all / few
    );
    println!("LOADHASHKEY over the Xen transport, {n} devices, 64 in flight: {all_64:.0}/s");
    drop(mgr);
    let _ = std::fs::remove_file(&store);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
