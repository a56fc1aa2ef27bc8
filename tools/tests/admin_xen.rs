//! `xvtpm vtpm|group --manager-domain`: the tool in dom0 manages a manager that runs in its
//! own domain (here domain 3 of the simulated Xen, Debian's swtpm as its TPM), over a vtpm
//! device it makes for each command and removes after it. No other domain gets in.

use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use xvtpm_backend::{Backend, BackendConfig, BackendHandle, DeviceFilter};
use xvtpm_frontend::{Frontend, FrontendConfig};
use xvtpm_proto::mgr::{self as proto, Request};
use xvtpm_tests::swtpm::SwtpmProcess;
use xvtpm_tis::swtpm::{Address, Swtpm};
use xvtpm_tis::Family;
use xvtpm_vtpmmgr::manager::{InitConfig, Manager};
use xvtpm_vtpmmgr::server::XenHandler;
use xvtpm_vtpmmgr::store::dev::FileDev;
use xvtpm_xen::sim::{toolstack, SimHost};
use xvtpm_xen::{TxId, Xen, Xenstore};

const XVTPM: &str = env!("CARGO_BIN_EXE_xvtpm");
const MGR: u16 = 3;

/// The manager in domain 3, taking management commands from `admin`'s devices.
fn manager(host: &SimHost, admin: u16) -> (SwtpmProcess, BackendHandle) {
    let p = SwtpmProcess::start(&host.dir().join("hwtpm"), true).expect("swtpm (apt-get install swtpm)");
    let tpm =
        Swtpm::connect(&Address::Unix(p.data.clone()), &Address::Unix(p.ctrl.clone()), Family::Tpm20).expect("connect");
    let dev = FileDev::open(&host.dir().join("mgr.img"), true).expect("store");
    let m = Manager::init(dev, Box::new(tpm), &InitConfig { pcrs: vec![0], ..InitConfig::default() }).expect("init");
    let handler = Arc::new(XenHandler::new(Arc::new(Mutex::new(m))).admin_from(admin));
    let be = Backend::new(Arc::new(host.xen(MGR)), handler, BackendConfig::serving(DeviceFilter::All))
        .spawn()
        .expect("backend");
    (p, be)
}

/// A simulated Xen with dom0 and the manager's domain "vtpmmgr" (3), its manager running.
fn manager_domain(admin: u16) -> (SimHost, Xenstore, SwtpmProcess, BackendHandle) {
    let host = SimHost::temp().expect("sim");
    let xs = host.xen(0).xenstore().expect("xs");
    toolstack::init_dom0(&xs).expect("dom0");
    toolstack::add_domain(&xs, MGR, "vtpmmgr").expect("manager domain");
    let (tpm, mgr) = manager(&host, admin);
    (host, xs, tpm, mgr)
}

fn xvtpm(host: &SimHost, domid: u16, args: &[&str]) -> Output {
    xvtpm_to(host, domid, "vtpmmgr", args)
}

fn xvtpm_to(host: &SimHost, domid: u16, manager: &str, args: &[&str]) -> Output {
    let dir = host.dir().to_str().expect("utf-8").to_string();
    Command::new(XVTPM)
        .args(args)
        .args(["--manager-domain", manager, "--sim", &dir, "--domid", &domid.to_string()])
        .output()
        .expect("xvtpm")
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The children of `path` (none when it does not exist).
fn children(xs: &Xenstore, path: &str) -> Vec<String> {
    match xs.directory(TxId::NONE, path) {
        Err(e) if e.is_enoent() => Vec::new(),
        r => r.expect("directory"),
    }
}

#[test]
fn dom0_manages_a_manager_in_its_own_domain() {
    let (host, xs, _tpm, _mgr) = manager_domain(0);

    let g = stdout(&xvtpm(&host, 0, &["group", "new", "--json"]));
    assert!(g.starts_with("{\"group\":1,\"uuid\":\""), "{g}");
    let u = "5e1f0a2b-7c3d-4e5f-8a9b-0c1d2e3f4a5b";
    assert_eq!(stdout(&xvtpm(&host, 0, &["vtpm", "provision", "--uuid", u, "--group", "1"])), u);
    assert_eq!(
        stdout(&xvtpm(&host, 0, &["vtpm", "show", u, "--json"])),
        format!("{{\"uuid\":\"{u}\",\"group\":1,\"has_key\":false,\"exported\":false}}")
    );
    // A list longer than one reply: paged within tpmif's 4088-byte packets.
    for _ in 0..300 {
        assert!(xvtpm(&host, 0, &["vtpm", "provision", "--group", "1"]).status.success());
    }
    let list = stdout(&xvtpm(&host, 0, &["vtpm", "list", "--group", "1"]));
    assert_eq!(list.lines().count(), 301, "every vTPM of group 1 listed");
    assert!(list.lines().any(|l| l == u));
    let groups = stdout(&xvtpm(&host, 0, &["group", "list", "--json"]));
    assert!(groups.contains("{\"group\":1,") && groups.contains("\"vtpms\":301}"), "{groups}");
    assert!(xvtpm(&host, 0, &["vtpm", "delete", u]).status.success());
    let gone = xvtpm(&host, 0, &["vtpm", "show", u]);
    assert_eq!(gone.status.code(), Some(3), "no such vTPM: exit 3");

    // Every command's device is gone after it, on both sides.
    std::thread::sleep(Duration::from_millis(100));
    assert!(children(&xs, "/local/domain/0/device/xvtpm-admin").is_empty());
    assert!(children(&xs, &format!("/local/domain/{MGR}/backend/vtpm/0")).is_empty());

    // A device left by a tool that was killed (its pid is gone) is removed by the next tool;
    // one whose tool still runs is left alone.
    let mut dead = Command::new("true").spawn().expect("true");
    let dead_pid = dead.id();
    dead.wait().expect("wait");
    let stale = |handle: u32, pid: u32| {
        let fe = format!("/local/domain/0/device/xvtpm-admin/{handle}");
        xs.transaction(|tx| {
            toolstack::add_vtpm_at(&xs, tx, &fe, 0, MGR, handle, "5e1f0a2b-7c3d-4e5f-8a9b-0c1d2e3f4aff")?;
            xs.write(tx, &format!("{fe}/xvtpm-pid"), pid.to_string().as_bytes())
        })
        .expect("stale device");
    };
    stale(1000, dead_pid);
    stale(1001, std::process::id());
    assert!(xvtpm(&host, 0, &["group", "list"]).status.success());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(children(&xs, "/local/domain/0/device/xvtpm-admin"), vec!["1001".to_string()]);
    assert_eq!(children(&xs, &format!("/local/domain/{MGR}/backend/vtpm/0")), vec!["1001".to_string()]);
}

#[test]
fn no_other_domain_gets_the_management_commands() {
    let (host, xs, _tpm, _mgr) = manager_domain(0);
    toolstack::add_domain(&xs, 5, "guest").expect("guest");

    // The tool in a guest cannot find the manager's domain by name (a guest cannot list the
    // domains), nor make its device given the id: the manager's backend directory is the
    // toolstack's to write.
    let o = xvtpm(&host, 5, &["vtpm", "list"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("list the domains") && err.contains("EACCES"), "{err}");
    let o = xvtpm_to(&host, 5, "3", &["vtpm", "list"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("make a vtpm device to domain 3") && err.contains("EACCES"), "{err}");

    // A guest's device to the manager (as a vTPM domain has): management ordinals refused.
    toolstack::add_vtpm(&xs, 5, MGR, 0, "6a6b6c6d-6e6f-4071-8273-747576777879").expect("device");
    let mut fe = Frontend::connect(&host.xen(5), FrontendConfig::default()).expect("connects");
    let r = fe.transmit(&Request::GroupNew.encode()).expect("reply");
    assert_eq!(u32::from_be_bytes([r[6], r[7], r[8], r[9]]), proto::status::AUTHFAIL);
    fe.close().expect("close");

    // dom0's device is the admin's, and nothing else: vTPM ordinals are refused on it.
    toolstack::add_vtpm(&xs, 0, MGR, 0, "7a7b7c7d-7e7f-4081-8283-848586878889").expect("device");
    let mut fe = Frontend::connect(&host.xen(0), FrontendConfig::default()).expect("connects");
    let r = fe.transmit(&Request::LoadHashKey.encode()).expect("reply");
    assert_eq!(u32::from_be_bytes([r[6], r[7], r[8], r[9]]), proto::status::AUTHFAIL);
    fe.close().expect("close");

    // A manager not told to trust dom0 refuses it too.
    let (host2, _xs2, _tpm2, _mgr2) = manager_domain(7);
    let o = xvtpm(&host2, 0, &["group", "new"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("the manager refused"), "{err}");
}
