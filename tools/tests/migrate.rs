//! Moving a vTPM to another manager with `xvtpm vtpm migration-key|export|import`: two
//! managers (each on its own swtpm, admin and vTPM sockets), a real `vtpm serve` on the
//! simulated Xen holding a guest's owner password, stopped, exported from A, its state
//! directory copied, imported at B, started at B: the guest's TPM is the same. A is frozen
//! for it from the export on; a bundle for another manager, a damaged one, one from a source
//! B has not pinned, a second import and a replayed one are refused, and a second export to
//! another manager needs --force.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use xvtpm_frontend::{Frontend, FrontendConfig};
use xvtpm_tests::swtpm::SwtpmProcess;
use xvtpm_tests::tpm2::change_owner_auth;
use xvtpm_tis::swtpm::{Address, Swtpm};
use xvtpm_tis::Family;
use xvtpm_vtpmmgr::manager::{InitConfig, Manager};
use xvtpm_vtpmmgr::server;
use xvtpm_vtpmmgr::store::dev::FileDev;
use xvtpm_xen::sim::{toolstack, SimHost};
use xvtpm_xen::Xen;

const XVTPM: &str = env!("CARGO_BIN_EXE_xvtpm");
const VTPM_UUID: &str = "3c4d5e6f-7081-4293-a4b5-c6d7e8f90a1b";
const GUEST_UUID: &str = "4d5e6f70-8192-43a4-b5c6-d7e8f90a1b2c";

/// A manager with its admin and vTPM sockets in `dir`.
struct Site {
    _tpm: SwtpmProcess,
    admin: PathBuf,
    vtpms: PathBuf,
}

fn site(dir: &Path) -> Site {
    std::fs::create_dir_all(dir).expect("dir");
    let p = SwtpmProcess::start(&dir.join("tpm"), true).expect("swtpm (apt-get install swtpm)");
    let tpm =
        Swtpm::connect(&Address::Unix(p.data.clone()), &Address::Unix(p.ctrl.clone()), Family::Tpm20).expect("connect");
    let dev = FileDev::open(&dir.join("mgr.img"), true).expect("store");
    let m = Manager::init(dev, Box::new(tpm), &InitConfig { pcrs: vec![0], ..InitConfig::default() }).expect("init");
    let m = Arc::new(Mutex::new(m));
    let (admin, vtpms) = (dir.join("admin.sock"), dir.join("vtpm.sock"));
    server::serve_unix(m.clone(), &admin, true, 16).expect("admin socket");
    server::serve_unix(m, &vtpms, false, 16).expect("vTPM socket");
    Site { _tpm: p, admin, vtpms }
}

fn xvtpm(s: &Site, args: &[&str]) -> Output {
    Command::new(XVTPM).args(args).arg("--admin-socket").arg(&s.admin).output().expect("xvtpm")
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

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
    let log = state.with_extension(format!("log{}", std::process::id()));
    let child = vtpm(bins, host, s, state, token, "serve")
        .args(["--uuid", GUEST_UUID])
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
