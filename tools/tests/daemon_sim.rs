//! `xvtpmd` on the simulated Xen: a guest's device is all it takes to get a vTPM; the vtpm it
//! starts is restarted when it dies (the running guest keeps its PCRs) and stopped when the
//! device goes; a vTPM the host does not have is refused, saying how to have it created; with
//! the manager, the vTPM is provisioned there and no key is left on disk.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use xvtpm_frontend::{Frontend, FrontendConfig};
use xvtpm_tests::tpm2::{pcr_extend_sha256, pcr_read_sha256, rc};
use xvtpm_xen::sim::{toolstack, SimHost};
use xvtpm_xen::{TxId, Xen, XenbusState};

const XVTPM: &str = env!("CARGO_BIN_EXE_xvtpm");
const XVTPMD: &str = env!("CARGO_BIN_EXE_xvtpmd");
const UUID: &str = "5a5b5c5d-5e5f-4061-8263-646566676869";
const GUEST: u16 = 5;

struct Daemon {
    child: Child,
    log: PathBuf,
    status: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // As systemd stops it: SIGTERM, so it stops its vtpms.
        let _ = xvtpm_vtpm::sys::signals::terminate(self.child.id());
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn start(host: &SimHost, dir: &Path, auto_create: bool) -> Daemon {
        Self::start_with(host, dir, auto_create, &["--insecure-keyless"])
    }

    fn start_with(host: &SimHost, dir: &Path, auto_create: bool, keys: &[&str]) -> Daemon {
        let bins = xvtpm_tests::bins::vtpm_and_vtpmmgr(XVTPM);
        let log = dir.join("xvtpmd.log");
        let status = dir.join("status.json");
        let mut cmd = Command::new(XVTPMD);
        cmd.arg("--vtpm")
            .arg(bins.join("vtpm"))
            .arg("--state-root")
            .arg(dir.join("vtpms"))
            .arg("--snapshot-dir")
            .arg(dir.join("snapshots"))
            .arg("--status-file")
            .arg(&status)
            .arg("--sim")
            .arg(host.dir())
            .args(["--domid", "0"])
            .args(keys);
        if auto_create {
            cmd.arg("--auto-create");
        }
        let child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("xvtpmd");
        let d = Daemon { child, log, status };
        d.wait_for("watching", |l| l.contains("watching"));
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn status(&self) -> serde_json::Value {
        std::fs::read(&self.status).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    fn wait_for(&self, what: &str, ok: impl Fn(&str) -> bool) {
        let end = Instant::now() + Duration::from_secs(30);
        while !ok(&self.log()) {
            assert!(Instant::now() < end, "xvtpmd: no {what}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the first status entry is in `state`: the file is written after the log line
    /// and the xenstore refusal, so it is awaited, not read once.
    fn wait_state(&self, state: &str) {
        let end = Instant::now() + Duration::from_secs(15);
        while self.status()[0]["state"] != state {
            assert!(Instant::now() < end, "status never {state}: {}\n{}", self.status(), self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the status shows the vTPM running, with a pid other than `not`.
    fn running_pid(&self, not: Option<u64>) -> u64 {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status();
            let entry = s.as_array().and_then(|a| a.iter().find(|e| e["uuid"] == UUID)).cloned();
            if let Some(e) = entry {
                if e["state"] == "running" && e["pid"].as_u64().is_some() && e["pid"].as_u64() != not {
                    return e["pid"].as_u64().unwrap_or_default();
                }
            }
            assert!(Instant::now() < end, "vTPM not running: {s}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn guest(host: &SimHost) {
    let xs = host.xen(0).xenstore().expect("xs");
    toolstack::init_dom0(&xs).expect("dom0");
    toolstack::add_domain(&xs, GUEST, "guest").expect("guest");
    toolstack::add_vtpm(&xs, GUEST, 0, 0, UUID).expect("the guest's vtpm= line");
}

fn pcr16(fe: &mut Frontend) -> Vec<u8> {
    let r = fe.transmit(&pcr_read_sha256(16)).expect("PCR_Read");
    assert_eq!(rc(&r), 0);
    r[r.len() - 32..].to_vec()
}

#[test]
fn a_guest_device_gets_a_vtpm_restarted_when_it_dies_and_stopped_when_the_device_goes() {
    let host = SimHost::temp().expect("sim");
    let dir = host.dir().join("host");
    std::fs::create_dir_all(&dir).expect("dir");
    let d = Daemon::start(&host, &dir, true);
    guest(&host);
    let pid = d.running_pid(None);
    assert!(dir.join("vtpms").join(UUID).is_dir(), "the vTPM was created on first use");

    let cfg = FrontendConfig { command_timeout: Duration::from_secs(30), ..FrontendConfig::default() };
    let mut fe =
        Frontend::connect(&host.xen(GUEST), cfg).unwrap_or_else(|e| panic!("guest connects: {e}\n{}", d.log()));
    assert_eq!(rc(&fe.transmit(&pcr_extend_sha256(16, &[0x16; 32])).expect("extend")), 0);
    let measured = pcr16(&mut fe);
    assert_ne!(measured, vec![0u8; 32]);

    // At rest the daemon never wakes (its vtpm neither: serve_sim.rs).
    std::thread::sleep(Duration::from_millis(300));
    let (before, _) = xvtpm_tests::procstat::wakeups(d.child.id());
    std::thread::sleep(Duration::from_secs(5));
    let (after, threads) = xvtpm_tests::procstat::wakeups(d.child.id());
    assert_eq!(after - before, 0, "xvtpmd woke at rest: {threads:?}");

    // The vtpm dies under the running guest: restarted, and the guest's PCRs are still there.
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    let pid2 = d.running_pid(Some(pid));
    assert_eq!(pcr16(&mut fe), measured, "PCR 16 after the restart; {}", d.log());
    let out = Command::new(XVTPM).args(["status", "--json", "--status-file"]).arg(&d.status).output().expect("xvtpm");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("xvtpm status --json");
    assert_eq!((s[0]["uuid"].as_str(), s[0]["guest"].as_u64()), (Some(UUID), Some(u64::from(GUEST))), "{s}");
    assert_eq!(
        (s[0]["state"].as_str(), s[0]["pid"].as_u64(), s[0]["restarts"].as_u64()),
        (Some("running"), Some(pid2), Some(1))
    );
    assert!(s[0]["last_error"].as_str().is_some_and(|e| e.contains("signal: 9")), "{s}");
    let table = Command::new(XVTPM).args(["status", "--status-file"]).arg(&d.status).output().expect("xvtpm");
    assert!(String::from_utf8_lossy(&table.stdout)
        .lines()
        .nth(1)
        .is_some_and(|l| l.contains(UUID) && l.contains("running")));
    assert!(d.log().contains(&format!("guest {GUEST} vtpm 0: vtpm for {UUID}")), "the log names the guest");

    // The device goes (the guest is destroyed): its vtpm stops.
    fe.close().expect("close");
    let xs = host.xen(0).xenstore().expect("xs");
    let t = Instant::now();
    let closed = toolstack::remove_vtpm(&xs, GUEST, 0, 0, Duration::from_secs(10)).expect("remove the device");
    assert!(
        closed && t.elapsed() < Duration::from_secs(5),
        "the vtpm answered the removal (Closed) at once:\n{}",
        d.log()
    );
    let end = Instant::now() + Duration::from_secs(15);
    while Path::new(&format!("/proc/{pid2}")).exists() {
        assert!(Instant::now() < end, "the vtpm outlived its device:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let end = Instant::now() + Duration::from_secs(5);
    while d.status().as_array().is_none_or(|a| !a.is_empty()) {
        assert!(Instant::now() < end, "status still lists the vTPM: {}", d.status());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_vtpm_this_host_does_not_have_is_refused_saying_how_to_create_it() {
    let host = SimHost::temp().expect("sim");
    let dir = host.dir().join("host");
    std::fs::create_dir_all(&dir).expect("dir");
    let d = Daemon::start(&host, &dir, false);
    guest(&host);
    let xs = host.xen(0).xenstore().expect("xs");
    let be = format!("/local/domain/0/backend/vtpm/{GUEST}/0");
    let closed = toolstack::wait_for_state(&xs, &format!("{be}/state"), XenbusState::Closed, Duration::from_secs(15));
    assert!(closed, "device not closed:\n{}", d.log());
    let error = String::from_utf8(xs.read(TxId::NONE, &format!("{be}/error")).expect("error")).expect("utf-8");
    assert!(error.contains(UUID) && error.contains("--auto-create"), "{error}");
    assert!(d.log().contains(&format!("guest {GUEST} vtpm 0: vTPM {UUID}: no vTPM here")), "{}", d.log());
    d.wait_state("refused");
    assert!(!dir.join("vtpms").join(UUID).exists(), "nothing was created");
}

/// A manager that accepts connections and never answers: the create is given up after
/// `--create-timeout-secs`, undone on disk, the device refused with the reason in the log,
/// and the daemon goes on (it answers the device's removal).
#[test]
fn a_manager_that_never_answers_costs_one_create_timeout_not_the_daemon() {
    let host = SimHost::temp().expect("sim");
    let dir = host.dir().join("host");
    std::fs::create_dir_all(&dir).expect("dir");
    let (vs, asock) = (dir.join("mgr.sock"), dir.join("admin.sock"));
    let mut held = Vec::new();
    for path in [&vs, &asock] {
        let l = std::os::unix::net::UnixListener::bind(path).expect("bind");
        held.push(std::thread::spawn(move || {
            // Keep every connection open, read nothing, answer nothing.
            let kept: Vec<_> = l.incoming().take(8).collect();
            drop(kept);
        }));
    }
    let (vs, asock) = (vs.to_string_lossy().into_owned(), asock.to_string_lossy().into_owned());
    let keys = ["--manager-socket", &vs, "--admin-socket", &asock, "--create-timeout-secs", "1"];
    let d = Daemon::start_with(&host, &dir, true, &keys);
    let t = Instant::now();
    guest(&host);
    let xs = host.xen(0).xenstore().expect("xs");
    let be = format!("/local/domain/0/backend/vtpm/{GUEST}/0");
    let closed = toolstack::wait_for_state(&xs, &format!("{be}/state"), XenbusState::Closed, Duration::from_secs(15));
    assert!(closed, "device not closed:\n{}", d.log());
    assert!(t.elapsed() < Duration::from_secs(10), "took {:?}:\n{}", t.elapsed(), d.log());
    d.wait_for("the reason", |l| l.contains("provisioning at the manager"));
    d.wait_state("refused");
    // Not made: the manager could not be told to forget it either, so the directory stays,
    // marked as a create cut short, for the next try to undo.
    let vtpm_dir = dir.join("vtpms").join(UUID);
    assert!(!vtpm_dir.join("made").exists(), "a vTPM that was never made is marked made");
    assert!(d.log().contains("did not answer within 1s"), "{}", d.log());
    // Still serving: the device's removal is seen at once.
    assert!(toolstack::remove_vtpm(&xs, GUEST, 0, 0, Duration::from_secs(10)).expect("remove"), "{}", d.log());
    let end = Instant::now() + Duration::from_secs(10);
    while d.status().as_array().is_none_or(|a| !a.is_empty()) {
        assert!(Instant::now() < end, "the removed device is still listed: {}\n{}", d.status(), d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(d);
}

/// Two guests whose devices name the same vTPM: the second is closed, never served by the
/// first one's vtpm (which serves its own device only).
#[test]
fn a_second_device_naming_the_same_vtpm_is_refused() {
    let host = SimHost::temp().expect("sim");
    let dir = host.dir().join("host");
    std::fs::create_dir_all(&dir).expect("dir");
    let d = Daemon::start(&host, &dir, true);
    guest(&host);
    d.running_pid(None);
    let xs = host.xen(0).xenstore().expect("xs");
    toolstack::add_domain(&xs, 6, "copycat").expect("guest");
    toolstack::add_vtpm(&xs, 6, 0, 0, UUID).expect("the same uuid");
    let be = "/local/domain/0/backend/vtpm/6/0";
    let closed = toolstack::wait_for_state(&xs, &format!("{be}/state"), XenbusState::Closed, Duration::from_secs(15));
    assert!(closed, "second device not closed:\n{}", d.log());
    let error = String::from_utf8(xs.read(TxId::NONE, &format!("{be}/error")).expect("error")).expect("utf-8");
    assert!(error.contains("another device names this vTPM"), "{error}");
    let s = d.status();
    assert_eq!(s.as_array().map(Vec::len), Some(1), "{s}");
    assert_eq!((s[0]["guest"].as_u64(), s[0]["state"].as_str()), (Some(u64::from(GUEST)), Some("running")));
    // The first guest still has its TPM.
    let mut fe = Frontend::connect(&host.xen(GUEST), FrontendConfig::default()).expect("first guest connects");
    assert_eq!(rc(&fe.transmit(&pcr_read_sha256(16)).expect("read")), 0);
    fe.close().expect("close");
}

#[test]
fn with_the_manager_from_the_configuration_a_vtpm_is_provisioned_there_and_keeps_no_key_on_disk() {
    let host = SimHost::temp().expect("sim");
    let dir = host.dir().join("host");
    std::fs::create_dir_all(&dir).expect("dir");
    let (_tpm, vtpm_sock, admin_sock) = common::manager(&dir);
    let (vs, asock) = (vtpm_sock.to_str().expect("utf-8"), admin_sock.to_str().expect("utf-8"));
    // Set up through the configuration file, as a packaged service is.
    let config = dir.join("xvtpmd.toml");
    std::fs::write(&config, format!("auto-create = true\nmanager-socket = {vs:?}\nadmin-socket = {asock:?}\n"))
        .expect("config");
    let d = Daemon::start_with(&host, &dir, false, &["--config", config.to_str().expect("utf-8")]);
    guest(&host);
    let pid = d.running_pid(None);
    let v = dir.join("vtpms").join(UUID);
    assert!(v.join("token").exists() && !v.join("key").exists(), "a token, no key file");
    let show = || {
        let o = Command::new(XVTPM)
            .args(["vtpm", "show", UUID, "--json", "--admin-socket", asock])
            .output()
            .expect("xvtpm");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(show().contains("\"has_key\":true"), "provisioned, its first state saved: {}", show());
    let cfg = FrontendConfig { command_timeout: Duration::from_secs(30), ..FrontendConfig::default() };
    let mut fe =
        Frontend::connect(&host.xen(GUEST), cfg).unwrap_or_else(|e| panic!("guest connects: {e}\n{}", d.log()));
    assert_eq!(rc(&fe.transmit(&pcr_extend_sha256(16, &[0x61; 32])).expect("extend")), 0);
    let measured = pcr16(&mut fe);
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    d.running_pid(Some(pid));
    assert_eq!(pcr16(&mut fe), measured, "PCR 16 after the restart; {}", d.log());
    fe.close().expect("close");
}

/// What the `xvtpm-qemu-dm` wrapper writes for an HVM guest: its TPM request.
fn hvm_request(host: &SimHost, domid: u16, incoming: bool) -> String {
    hvm_request_in(host, domid, incoming, "requested")
}

/// A TPM request already in `state` (one served before says `ready`).
fn hvm_request_in(host: &SimHost, domid: u16, incoming: bool, state: &str) -> String {
    use xvtpm_xen::xenbus::{hvm_request_path, HVM_INCOMING_KEY, HVM_STATE_KEY, HVM_UUID_KEY};
    let xs = host.xen(0).xenstore().expect("xs");
    toolstack::add_domain(&xs, domid, "hvm").expect("domain");
    let dir = hvm_request_path(domid);
    xs.transaction(|tx| {
        xs.write(tx, &format!("{dir}/{HVM_UUID_KEY}"), UUID.as_bytes())?;
        if incoming {
            xs.write(tx, &format!("{dir}/{HVM_INCOMING_KEY}"), b"1")?;
        }
        xs.write(tx, &format!("{dir}/{HVM_STATE_KEY}"), state.as_bytes())
    })
    .expect("request");
    dir
}

/// The refused domain is destroyed (by xl, as its device model failed): its request goes.
fn gone(host: &SimHost, domid: u16, request: &str) {
    let xs = host.xen(0).xenstore().expect("xs");
    toolstack::remove_domain(&xs, domid).expect("domain gone");
    xs.try_rm(TxId::NONE, request).expect("request gone");
}

/// Waits until the request's state is `want`; then its error, if any.
fn request_state(host: &SimHost, dir: &str, want: &str, d: &Daemon) -> String {
    let xs = host.xen(0).xenstore().expect("xs");
    let read = |k: &str| xs.try_read(TxId::NONE, &format!("{dir}/{k}")).expect("read").unwrap_or_default();
    let end = Instant::now() + Duration::from_secs(15);
    while read("state") != want.as_bytes() {
        assert!(Instant::now() < end, "{dir} never {want}:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    String::from_utf8_lossy(&read("error")).into_owned()
}

/// An HVM guest that arrives (a restore, or a migration's receiving end) never gets a new
/// vTPM, even with auto-create: it would hand the running guest reset PCRs. While
/// `xvtpm migrate-accept` puts its vTPM in place (the `arriving` mark it holds locked), the
/// wrapper hears `arriving` (and starts the device model); if the accepter gives up (the
/// directory goes) or is gone (its mark stays), the guest is refused, never served a
/// half-arrived vTPM.
#[test]
fn an_arriving_hvm_guest_waits_for_its_vtpm_and_is_refused_if_its_migration_fails() {
    let host = SimHost::temp().expect("sim");
    let dir = host.dir().join("host");
    std::fs::create_dir_all(&dir).expect("dir");
    let d = Daemon::start(&host, &dir, true);
    toolstack::init_dom0(&host.xen(0).xenstore().expect("xs")).expect("dom0");
    let vtpm = dir.join("vtpms").join(UUID);

    let restored = hvm_request(&host, 11, true);
    let why = request_state(&host, &restored, "refused", &d);
    assert!(why.contains("xvtpm migrate"), "{why}");
    assert!(!vtpm.exists(), "no vTPM is made for an arriving guest");
    gone(&host, 11, &restored);

    // An accepter at work: it holds its mark's lock.
    std::fs::create_dir_all(vtpm.join("state")).expect("state");
    let accepter = std::fs::File::create(vtpm.join("arriving")).expect("mark");
    accepter.try_lock().expect("lock");
    let arriving = hvm_request(&host, 12, true);
    request_state(&host, &arriving, "arriving", &d);
    d.wait_for("the arrival logged", |l| l.contains("arrives by a migration"));
    assert!(
        d.status().as_array().is_some_and(|a| a.iter().any(|e| e["guest"] == 12 && e["state"] == "arriving")),
        "{}",
        d.status()
    );
    // The migration fails: the accepter removes what it set up and says so.
    std::fs::remove_dir_all(&vtpm).expect("undo");
    drop(accepter);
    let xs = host.xen(0).xenstore().expect("xs");
    xs.write(TxId::NONE, &format!("{arriving}/arrived"), b"1").expect("arrived");
    let why = request_state(&host, &arriving, "refused", &d);
    assert!(why.contains("did not complete"), "{why}");
    gone(&host, 12, &arriving);

    // It completes: `made`, the mark gone, `arrived` (the rescan): xvtpmd starts its vtpm.
    std::fs::create_dir_all(vtpm.join("state")).expect("state");
    let accepter = std::fs::File::create(vtpm.join("arriving")).expect("mark");
    accepter.try_lock().expect("lock");
    let arriving = hvm_request(&host, 15, true);
    request_state(&host, &arriving, "arriving", &d);
    std::fs::write(vtpm.join("tpm-version"), b"2.0\n").expect("version");
    std::fs::write(vtpm.join("made"), b"").expect("made");
    std::fs::remove_file(vtpm.join("arriving")).expect("unmark");
    drop(accepter);
    xs.write(TxId::NONE, &format!("{arriving}/arrived"), b"1").expect("arrived");
    d.wait_for("the vtpm started", |l| {
        l.contains(&format!("HVM guest 15: vTPM {UUID} arrived")) && l.contains(&format!("vtpm for {UUID} started"))
    });
    gone(&host, 15, &arriving);
    let end = Instant::now() + Duration::from_secs(15);
    while d.status().as_array().is_some_and(|a| a.iter().any(|e| e["guest"] == 15)) {
        assert!(Instant::now() < end, "guest 15's vTPM is still listed: {}", d.status());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::remove_dir_all(&vtpm).expect("clear");

    // An accepter that died and left its mark: refused at once, with the recovery in the log.
    std::fs::create_dir_all(vtpm.join("state")).expect("state");
    std::fs::write(vtpm.join("arriving"), b"4242").expect("mark");
    let stale = hvm_request(&host, 14, true);
    let why = request_state(&host, &stale, "refused", &d);
    assert!(why.contains("did not complete"), "{why}");
    d.wait_for("the recovery", |l| l.contains("cut short") && l.contains("xvtpm vtpm delete"));
    assert!(vtpm.join("arriving").exists(), "xvtpmd leaves the operator's evidence alone");
}

/// An HVM guest served before (its request says `ready`) whose vTPM xvtpmd then cannot serve
/// (here: gone from the host) keeps `ready`, the reason beside it: the next vtpm resumes the
/// running guest, never takes it for a boot (a reset TPM).
#[test]
fn a_served_hvm_guest_stays_ready_when_its_vtpm_is_refused() {
    let host = SimHost::temp().expect("sim");
    let dir = host.dir().join("host");
    std::fs::create_dir_all(&dir).expect("dir");
    let d = Daemon::start(&host, &dir, false);
    toolstack::init_dom0(&host.xen(0).xenstore().expect("xs")).expect("dom0");
    let req = hvm_request_in(&host, 16, false, "ready");
    let xs = host.xen(0).xenstore().expect("xs");
    d.wait_for("the refusal", |l| l.contains("HVM guest 16: vTPM") && l.contains("no vTPM here"));
    let end = Instant::now() + Duration::from_secs(15);
    while xs.try_read(TxId::NONE, &format!("{req}/error")).expect("read").is_none() {
        assert!(Instant::now() < end, "no reason written:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(xs.read(TxId::NONE, &format!("{req}/state")).expect("state"), b"ready", "{}", d.log());
}
