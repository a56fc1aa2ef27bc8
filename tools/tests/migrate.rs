//! Moving a vTPM to another manager with `xvtpm vtpm migration-key|export|import`: two
//! managers (each on its own swtpm, admin and vTPM sockets), a real `vtpm serve` on the
//! simulated Xen holding a guest's owner password, stopped, exported from A, its state
//! directory copied, imported at B, started at B: the guest's TPM is the same. A is frozen
//! for it from the export on; a bundle for another manager, a damaged one, one from a source
//! B has not pinned, a second import and a replayed one are refused, and a second export to
//! another manager needs --force.

mod common;

use common::{site, stdout, xvtpm, Site};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use xvtpm_frontend::{Frontend, FrontendConfig};
use xvtpm_tests::tpm2::change_owner_auth;
use xvtpm_xen::sim::{toolstack, SimHost};
use xvtpm_xen::{ShutdownReason, Xen};

const XVTPM: &str = env!("CARGO_BIN_EXE_xvtpm");
const VTPM_UUID: &str = "3c4d5e6f-7081-4293-a4b5-c6d7e8f90a1b";
const GUEST_UUID: &str = "4d5e6f70-8192-43a4-b5c6-d7e8f90a1b2c";

fn fails(o: &Output, why: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(why), "expected {why:?} in: {err}");
}

struct Kill(Child, PathBuf);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn vtpm(bins: &Path, host: &SimHost, s: &Site, state: &Path, token: &Path, cmd: &str) -> Command {
    let mut c = Command::new(bins.join("vtpm"));
    c.arg(cmd).arg("--state-dir").arg(state).arg("--manager").arg(format!("unix:{}", s.vtpms.display()));
    c.args(["--vtpm-uuid", VTPM_UUID]).arg("--token-file").arg(token);
    c.arg("--sim").arg(host.dir()).args(["--domid", "0"]);
    c
}

/// `vtpm serve` for the guest's device; `Err(log)` if it stops before serving.
fn serve(bins: &Path, host: &SimHost, s: &Site, state: &Path, token: &Path) -> Result<Kill, String> {
    serve_with(bins, host, s, state, token, &[])
}

/// [`serve`] with more options.
fn serve_with(
    bins: &Path,
    host: &SimHost,
    s: &Site,
    state: &Path,
    token: &Path,
    extra: &[&str],
) -> Result<Kill, String> {
    let log = state.with_extension(format!("log{}", std::process::id()));
    let child = vtpm(bins, host, s, state, token, "serve")
        .args(["--uuid", GUEST_UUID])
        .args(extra)
        .arg("--snapshot-dir")
        .arg(host.dir().join("snapshots"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("vtpm serve");
    let mut k = Kill(child, log);
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&k.1).unwrap_or_default();
        if text.contains("watching") {
            return Ok(k);
        }
        if k.0.try_wait().expect("wait").is_some() || Instant::now() > end {
            return Err(text);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rc(r: &[u8]) -> u32 {
    u32::from_be_bytes([r[6], r[7], r[8], r[9]])
}

/// The guest changes its TPM's owner password from `old` to `new`; the TPM's response code.
fn owner_auth(host: &SimHost, old: &[u8], new: &[u8]) -> u32 {
    let cfg = FrontendConfig { command_timeout: Duration::from_secs(30), ..FrontendConfig::default() };
    let mut fe = Frontend::connect(&host.xen(7), cfg).expect("guest connects");
    let r = rc(&fe.transmit(&change_owner_auth(old, new)).expect("command"));
    fe.close().expect("close");
    r
}

#[test]
fn a_vtpm_moves_to_another_manager_and_keeps_its_contents() {
    let bins = xvtpm_tests::bins::vtpm_and_vtpmmgr(XVTPM);
    let host = SimHost::temp().expect("sim");
    let xs = host.xen(0).xenstore().expect("xs");
    let (a, b) = (site(&host.dir().join("a")), site(&host.dir().join("b")));
    toolstack::add_domain(&xs, 7, "guest").expect("guest");
    toolstack::add_vtpm(&xs, 7, 0, 0, GUEST_UUID).expect("guest's device");

    // At A: provision, manufacture, and the guest sets its owner password.
    let token = host.dir().join("token");
    std::fs::write(&token, [5u8; 32]).expect("token");
    let t = token.to_str().expect("utf-8");
    assert_eq!(stdout(&xvtpm(&a, &["vtpm", "provision", "--uuid", VTPM_UUID, "--token-file", t])), VTPM_UUID);
    let state = host.dir().join("state-a");
    let o = vtpm(&bins, &host, &a, &state, &token, "create").output().expect("create");
    assert!(o.status.success(), "create: {}", String::from_utf8_lossy(&o.stderr));
    let running = serve(&bins, &host, &a, &state, &token).expect("vtpm at A");
    assert_eq!(owner_auth(&host, b"", b"moved-secret"), 0);
    drop(running);

    // Export to B's migration key: A freezes the vTPM.
    let key = stdout(&xvtpm(&b, &["vtpm", "migration-key"]));
    assert_eq!(key.len(), 260, "{key}");
    let bundle = host.dir().join("vtpm.bundle");
    let bs = bundle.to_str().expect("utf-8");
    stdout(&xvtpm(&a, &["vtpm", "export", VTPM_UUID, "--to", &key, "--out", bs]));
    fails(&xvtpm(&a, &["vtpm", "export", VTPM_UUID, "--to", &key, "--out", bs]), "not overwritten");
    let shown = stdout(&xvtpm(&a, &["vtpm", "show", VTPM_UUID, "--json"]));
    assert!(shown.ends_with("\"has_key\":true,\"exported\":true}"), "{shown}");
    let refused = serve(&bins, &host, &a, &state, &token).err().expect("a frozen vTPM must not start at A");
    assert!(refused.contains("the manager refused this vTPM"), "{refused}");
    // A second export to another manager (here: A's own key) would make a second live copy.
    let a_key = stdout(&xvtpm(&a, &["vtpm", "migration-key"]));
    let other = host.dir().join("other.bundle");
    let os = other.to_str().expect("utf-8");
    fails(&xvtpm(&a, &["vtpm", "export", VTPM_UUID, "--to", &a_key, "--out", os]), "exported to another manager");
    // To B again (a lost bundle): allowed.
    let again = host.dir().join("again.bundle");
    stdout(&xvtpm(&a, &["vtpm", "export", VTPM_UUID, "--to", &key, "--out", again.to_str().expect("utf-8")]));

    // The bundle opens only at B, and only intact.
    fails(&xvtpm(&a, &["vtpm", "import", bs]), "another manager's migration key");
    let mut damaged = std::fs::read(&bundle).expect("bundle");
    damaged[200] ^= 1;
    let d = host.dir().join("damaged.bundle");
    std::fs::write(&d, damaged).expect("write");
    fails(&xvtpm(&b, &["vtpm", "import", d.to_str().expect("utf-8")]), "does not authenticate");
    assert_eq!(stdout(&xvtpm(&b, &["vtpm", "list"])), "", "nothing imported from a damaged bundle");

    // B takes bundles only from sources its operator pinned.
    fails(&xvtpm(&b, &["vtpm", "import", bs]), "not pinned here");
    assert_eq!(stdout(&xvtpm(&b, &["vtpm", "trust-source", &a_key])), "pinned");
    // Imported at B with the copied state directory: the same TPM.
    assert_eq!(stdout(&xvtpm(&b, &["vtpm", "import", bs])), VTPM_UUID);
    fails(&xvtpm(&b, &["vtpm", "import", bs]), "already provisioned");
    let moved = host.dir().join("state-b");
    let cp = Command::new("cp").arg("-a").arg(&state).arg(&moved).status().expect("cp");
    assert!(cp.success());
    let running = serve(&bins, &host, &b, &moved, &token).expect("vtpm at B");
    assert_ne!(owner_auth(&host, b"", b"x"), 0, "the owner password moved with the vTPM");
    assert_eq!(owner_auth(&host, b"moved-secret", b"at-b"), 0);
    drop(running);
    let shown = stdout(&xvtpm(&b, &["vtpm", "show", VTPM_UUID, "--json"]));
    assert!(shown.ends_with("\"has_key\":true,\"exported\":false}"), "{shown}");

    // A lets go of it for good.
    stdout(&xvtpm(&a, &["vtpm", "delete", VTPM_UUID]));
    assert_eq!(xvtpm(&a, &["vtpm", "show", VTPM_UUID]).status.code(), Some(3));

    // The old bundle replayed at B after the vTPM left B (an older copy of the vTPM): refused.
    stdout(&xvtpm(&b, &["vtpm", "delete", VTPM_UUID]));
    fails(&xvtpm(&b, &["vtpm", "import", bs]), "imported here before");
    // A unpinned: its bundles are refused from then on.
    stdout(&xvtpm(&b, &["vtpm", "distrust-source", &a_key]));
    fails(&xvtpm(&b, &["vtpm", "import", again.to_str().expect("utf-8")]), "not pinned here");
}

#[test]
fn an_export_can_come_back_to_its_manager() {
    let host = SimHost::temp().expect("sim");
    let a = site(&host.dir().join("a"));
    let u = stdout(&xvtpm(&a, &["vtpm", "provision"]));
    // Exporting to its own key and importing again undoes a move that did not happen.
    let key = host.dir().join("a.key");
    std::fs::write(&key, stdout(&xvtpm(&a, &["vtpm", "migration-key"])) + "\n").expect("key file");
    let bundle = host.dir().join("back.bundle");
    let (k, bs) = (key.to_str().expect("utf-8"), bundle.to_str().expect("utf-8"));
    stdout(&xvtpm(&a, &["vtpm", "export", &u, "--to", k, "--out", bs]));
    assert!(stdout(&xvtpm(&a, &["vtpm", "show", &u, "--json"])).ends_with("\"exported\":true}"));
    assert_eq!(stdout(&xvtpm(&a, &["vtpm", "import", bs])), u);
    assert!(stdout(&xvtpm(&a, &["vtpm", "show", &u, "--json"])).ends_with("\"exported\":false}"));
    // A malformed key is refused before anything is frozen.
    fails(&xvtpm(&a, &["vtpm", "export", &u, "--to", "04abcd", "--out", bs]), "a migration key is 260 hex digits");
    fails(
        &xvtpm(&a, &["vtpm", "export", &u, "--to", &"04".repeat(130), "--out", &format!("{bs}.2")]),
        "not a migration key",
    );
    assert!(stdout(&xvtpm(&a, &["vtpm", "show", &u, "--json"])).ends_with("\"exported\":false}"));
}

fn guest_cfg() -> FrontendConfig {
    FrontendConfig { command_timeout: Duration::from_secs(30), ..FrontendConfig::default() }
}

/// PCR 16 extended and a primary key loaded by the guest: (PCR_Read of 16, ReadPublic of it).
fn measure_and_load(fe: &mut Frontend) -> (Vec<u8>, u32, Vec<u8>) {
    use xvtpm_tests::tpm2;
    assert_eq!(rc(&fe.transmit(&tpm2::pcr_extend_sha256(16, &[0x61; 32])).expect("extend")), 0);
    let r = fe.transmit(&tpm2::create_primary_ecc_p256()).expect("create primary");
    assert_eq!(rc(&r), 0, "CreatePrimary");
    let handle = tpm2::created_handle(&r).expect("handle");
    let public = fe.transmit(&tpm2::read_public(handle)).expect("read public");
    assert_eq!(rc(&public), 0);
    (fe.transmit(&tpm2::pcr_read_sha256(16)).expect("PCR_Read"), handle, public)
}

fn wait_log(k: &Kill, needle: &str) {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&k.1).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(Instant::now() < end, "the vtpm never logged {needle:?}:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A provisioned, manufactured vTPM at `s`, served for the guest (domain 7 of `host`), which
/// extended PCR 16 and loaded a key: (the vtpm, its state directory, its token, the guest,
/// PCR 16, the key's handle, its public area).
#[allow(clippy::type_complexity)] // One use per test, all parts needed.
fn running_guest(bins: &Path, host: &SimHost, s: &Site) -> (Kill, PathBuf, PathBuf, Frontend, Vec<u8>, u32, Vec<u8>) {
    let xs = host.xen(0).xenstore().expect("xs");
    let token = host.dir().join("token");
    std::fs::write(&token, [6u8; 32]).expect("token");
    let t = token.to_str().expect("utf-8");
    assert_eq!(stdout(&xvtpm(s, &["vtpm", "provision", "--uuid", VTPM_UUID, "--token-file", t])), VTPM_UUID);
    let state = host.dir().join("state-a");
    let o = vtpm(bins, host, s, &state, &token, "create").output().expect("create");
    assert!(o.status.success(), "create: {}", String::from_utf8_lossy(&o.stderr));
    let running = serve(bins, host, s, &state, &token).expect("vtpm at A");
    toolstack::add_domain(&xs, 7, "guest").expect("guest");
    toolstack::add_vtpm(&xs, 7, 0, 0, GUEST_UUID).expect("guest's device");
    let mut fe = Frontend::connect(&host.xen(7), guest_cfg()).expect("guest connects");
    let (pcr, handle, public) = measure_and_load(&mut fe);
    (running, state, token, fe, pcr, handle, public)
}

/// The vTPM's part of a live migration, in the order `xl migrate` drives it: the destination's
/// vtpm serves the device before the state is there (`--incoming`); libxl suspends the guest at
/// the source, whose vtpm keeps that moment in a suspended snapshot; the source exports the
/// vTPM's key to the destination's manager (frozen at the source); the state directory, the
/// snapshot and the token go across; the destination imports; the guest resumes there in a new
/// domain with the same `vm` path: PCR 16 and a loaded key are as they were, and what it writes
/// is saved at the destination's manager. The source's manager refuses the vTPM.
#[test]
fn a_running_guests_vtpm_moves_live_with_its_pcrs_and_loaded_keys() {
    let bins = xvtpm_tests::bins::vtpm_and_vtpmmgr(XVTPM);
    let (ha, hb) = (SimHost::temp().expect("sim"), SimHost::temp().expect("sim"));
    let (a, b) = (site(&ha.dir().join("mgr")), site(&hb.dir().join("mgr")));
    let (at_a, state_a, token_a, fe, pcr, handle, public) = running_guest(&bins, &ha, &a);

    let (state_b, token_b) = (hb.dir().join("state-b"), hb.dir().join("token"));
    let incoming = serve_with(&bins, &hb, &b, &state_b, &token_b, &["--incoming"]).expect("incoming vtpm at B");
    let a_key = stdout(&xvtpm(&a, &["vtpm", "migration-key"]));
    assert_eq!(stdout(&xvtpm(&b, &["vtpm", "trust-source", &a_key])), "pinned");

    let xa = ha.xen(0).xenstore().expect("xs");
    toolstack::request_suspend(&xa, 7).expect("suspend");
    ha.shut_down(7, ShutdownReason::Suspend).expect("the guest suspends");
    wait_log(&at_a, "for its next domain");
    let bundle = ha.dir().join("vtpm.bundle");
    let b_key = stdout(&xvtpm(&b, &["vtpm", "migration-key"]));
    stdout(&xvtpm(&a, &["vtpm", "export", VTPM_UUID, "--to", &b_key, "--out", bundle.to_str().expect("utf-8")]));
    for f in std::fs::read_dir(&state_a).expect("state").flatten() {
        if f.file_name().to_string_lossy().ends_with(".xvtpm") {
            std::fs::copy(f.path(), state_b.join(f.file_name())).expect("copy state");
        }
    }
    let snaps = |h: &SimHost, st: &Path| {
        xvtpm_vtpm::snapshot::SnapshotFile::for_state_dir(&h.dir().join("snapshots"), st)
            .expect("snapshots")
            .paths()
            .clone()
    };
    for (from, to) in snaps(&ha, &state_a).iter().zip(snaps(&hb, &state_b).iter()) {
        if from.exists() {
            std::fs::copy(from, to).expect("copy snapshot");
        }
    }
    std::fs::copy(&token_a, &token_b).expect("token");
    assert_eq!(stdout(&xvtpm(&b, &["vtpm", "import", bundle.to_str().expect("utf-8")])), VTPM_UUID);

    // The guest resumes at B: a new domain, the same vm path.
    let xb = hb.xen(0).xenstore().expect("xs");
    toolstack::add_domain_of(&xb, 9, "guest", &toolstack::vm_path(7)).expect("domain at B");
    toolstack::add_vtpm(&xb, 9, 0, 0, GUEST_UUID).expect("device at B");
    let mut moved = Frontend::connect(&hb.xen(9), guest_cfg()).expect("the guest connects at B");
    use xvtpm_tests::tpm2;
    assert_eq!(moved.transmit(&tpm2::pcr_read_sha256(16)).expect("PCR_Read"), pcr, "PCR 16 at B");
    assert_eq!(moved.transmit(&tpm2::read_public(handle)).expect("read public"), public, "the loaded key at B");
    assert_eq!(rc(&moved.transmit(&change_owner_auth(b"", b"at-b")).expect("owner auth")), 0, "saved at B");
    wait_log(&incoming, "continues domain 7");

    // At A the guest's domain is destroyed; A's manager refuses the vTPM from now on.
    drop(fe);
    drop(at_a);
    let refused = serve(&bins, &ha, &a, &state_a, &token_a).err().expect("the vTPM must not start again at A");
    assert!(refused.contains("the manager refused this vTPM"), "{refused}");
}

/// A live migration called off after the export (the destination died before importing): the
/// source takes its vTPM back (exported to its own manager and imported there), the suspend is
/// cancelled, and the same guest goes on at the source with its PCRs and loaded key; what it
/// writes is saved again.
#[test]
fn a_live_move_called_off_leaves_the_guest_and_its_vtpm_at_the_source() {
    let bins = xvtpm_tests::bins::vtpm_and_vtpmmgr(XVTPM);
    let ha = SimHost::temp().expect("sim");
    let (a, b) = (site(&ha.dir().join("mgr")), site(&ha.dir().join("dst")));
    let (at_a, _state, _token, mut fe, pcr, handle, public) = running_guest(&bins, &ha, &a);
    toolstack::request_suspend(&ha.xen(0).xenstore().expect("xs"), 7).expect("suspend");
    ha.shut_down(7, ShutdownReason::Suspend).expect("the guest suspends");
    wait_log(&at_a, "for its next domain");
    let b_key = stdout(&xvtpm(&b, &["vtpm", "migration-key"]));
    let out = ha.dir().join("to-b.bundle");
    stdout(&xvtpm(&a, &["vtpm", "export", VTPM_UUID, "--to", &b_key, "--out", out.to_str().expect("utf-8")]));
    let shown = stdout(&xvtpm(&a, &["vtpm", "show", VTPM_UUID, "--json"]));
    assert!(shown.ends_with("\"exported\":true}"), "frozen at A: {shown}");
    // Taken back (the suspended guest sent nothing meanwhile).
    use xvtpm_tests::tpm2;
    let a_key = stdout(&xvtpm(&a, &["vtpm", "migration-key"]));
    let back = ha.dir().join("back.bundle");
    let bs = back.to_str().expect("utf-8");
    stdout(&xvtpm(&a, &["vtpm", "export", VTPM_UUID, "--to", &a_key, "--out", bs, "--force"]));
    assert_eq!(stdout(&xvtpm(&a, &["vtpm", "import", bs])), VTPM_UUID);
    ha.resume_domain(7).expect("libxl resumes the guest at the source");
    assert_eq!(fe.transmit(&tpm2::pcr_read_sha256(16)).expect("PCR_Read"), pcr);
    assert_eq!(fe.transmit(&tpm2::read_public(handle)).expect("read public"), public);
    assert_eq!(rc(&fe.transmit(&change_owner_auth(b"", b"still-at-a")).expect("owner auth")), 0, "saved again");
}
