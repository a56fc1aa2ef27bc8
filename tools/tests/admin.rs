//! `xvtpm vtpm|group|inspect-state` against a manager (in this process, Debian's swtpm as its
//! TPM) serving its admin socket: outputs, JSON, and exit codes scripts rely on.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use xvtpm_tests::swtpm::SwtpmProcess;
use xvtpm_tis::swtpm::{Address, Swtpm};
use xvtpm_tis::Family;
use xvtpm_vtpmmgr::manager::{InitConfig, Manager};
use xvtpm_vtpmmgr::server;
use xvtpm_vtpmmgr::store::dev::FileDev;

const XVTPM: &str = env!("CARGO_BIN_EXE_xvtpm");

fn manager(dir: &Path) -> (SwtpmProcess, PathBuf) {
    let p = SwtpmProcess::start(&dir.join("tpm"), true).expect("swtpm (apt-get install swtpm)");
    let (data, ctrl) = (p.data.clone(), p.ctrl.clone());
    let tpm = Swtpm::connect(&Address::Unix(data), &Address::Unix(ctrl), Family::Tpm20).expect("connect");
    let dev = FileDev::open(&dir.join("mgr.img"), true).expect("store");
    let m = Manager::init(dev, Box::new(tpm), &InitConfig { pcrs: vec![0], ..InitConfig::default() }).expect("init");
    let sock = dir.join("admin.sock");
    server::serve_unix(Arc::new(Mutex::new(m)), &sock, true, 16).expect("admin socket");
    (p, sock)
}

fn xvtpm(sock: &Path, args: &[&str]) -> Output {
    Command::new(XVTPM).args(args).arg("--admin-socket").arg(sock).output().expect("xvtpm")
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn vtpms_and_groups_through_the_admin_socket() {
    let dir = std::env::temp_dir().join(format!("xvtpm-tools-admin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (_tpm, sock) = manager(&dir);

    let g = stdout(&xvtpm(&sock, &["group", "new", "--json"]));
    assert!(g.starts_with("{\"group\":1,\"uuid\":\""), "{g}");
    let u = "5e1f0a2b-7c3d-4e5f-8a9b-0c1d2e3f4a5b";
    assert_eq!(stdout(&xvtpm(&sock, &["vtpm", "provision", "--uuid", u, "--group", "1"])), u);
    let token = dir.join("token");
    std::fs::write(&token, [7u8; 32]).expect("token");
    let v2 = stdout(&xvtpm(&sock, &["vtpm", "provision", "--token-file", token.to_str().expect("utf-8"), "--json"]));
    assert!(v2.starts_with("{\"uuid\":\"") && v2.ends_with("\"group\":0}"), "{v2}");
    assert_eq!(
        stdout(&xvtpm(&sock, &["vtpm", "list", "--group", "1", "--json"])),
        format!("[{{\"uuid\":\"{u}\",\"group\":1}}]")
    );
    assert_eq!(
        stdout(&xvtpm(&sock, &["vtpm", "show", u, "--json"])),
        format!("{{\"uuid\":\"{u}\",\"group\":1,\"has_key\":false,\"exported\":false}}")
    );
    let groups = stdout(&xvtpm(&sock, &["group", "list", "--json"]));
    assert!(groups.contains("{\"group\":0,") && groups.contains("\"vtpms\":1}"), "{groups}");

    // Exit codes: 3 for no such vTPM or group, 1 for a refusal, 2 for a usage error.
    let missing = "00000000-0000-4000-8000-000000000000";
    assert_eq!(xvtpm(&sock, &["vtpm", "show", missing]).status.code(), Some(3));
    assert_eq!(xvtpm(&sock, &["vtpm", "delete", missing]).status.code(), Some(3));
    assert_eq!(xvtpm(&sock, &["vtpm", "provision", "--group", "9"]).status.code(), Some(3));
    assert_eq!(xvtpm(&sock, &["group", "delete", "1"]).status.code(), Some(1), "not empty");
    assert_eq!(xvtpm(&sock, &["vtpm", "provision", "--uuid", u]).status.code(), Some(1), "twice");
    assert_eq!(xvtpm(&sock, &["vtpm", "show", "not-a-uuid"]).status.code(), Some(1));
    assert_eq!(Command::new(XVTPM).args(["vtpm", "frobnicate"]).output().expect("xvtpm").status.code(), Some(2));
    let gone = Command::new(XVTPM)
        .args(["vtpm", "list", "--admin-socket"])
        .arg(dir.join("nothing.sock"))
        .output()
        .expect("xvtpm");
    assert_eq!(gone.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&gone.stderr).contains("cannot reach the manager"));

    stdout(&xvtpm(&sock, &["vtpm", "delete", u]));
    stdout(&xvtpm(&sock, &["group", "delete", "1"]));
    assert!(!stdout(&xvtpm(&sock, &["group", "list"])).contains("\n1 "));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn inspect_state_shows_the_outside_only() {
    let dir = std::env::temp_dir().join(format!("xvtpm-tools-inspect-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let mut store = xvtpm_vtpm::state::file::FileStore::open(
        &dir,
        Some(xvtpm_vtpm::state::file::StateKey::from_bytes(&[9; 32]).expect("key")),
    )
    .expect("store");
    use xvtpm_vtpm::state::StateStore;
    store.store("tpm2-permall", b"the secret state").expect("store");
    let f = dir.join("tpm2-permall.xvtpm");
    let out = Command::new(XVTPM).args(["inspect-state", "--json"]).arg(&f).output().expect("xvtpm");
    let json = stdout(&out);
    assert!(json.contains("\"format\":\"key-file\"") && json.contains("\"protection\":\"aes-256-gcm\""), "{json}");
    assert!(json.contains("\"payload_bytes\":32"), "16 bytes of data and the tag: {json}");
    assert!(!json.contains("secret"), "never the contents");
    let junk = dir.join("junk");
    std::fs::write(&junk, b"not a state file at all").expect("write");
    let out = Command::new(XVTPM).arg("inspect-state").arg(&junk).output().expect("xvtpm");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an xvtpm state file"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn boot_hash_approvals_through_the_admin_socket() {
    let dir = std::env::temp_dir().join(format!("xvtpm-tools-approve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (_tpm, sock) = manager(&dir);
    let run = |args: &[&str]| Command::new(XVTPM).args(args).output().expect("xvtpm");
    // `measure --exe` is the SHA-256 of the file; a domain image hashes its parts separately.
    let exe = dir.join("vtpm-exe");
    std::fs::write(&exe, b"pretend vtpm").expect("exe");
    let exe_s = exe.to_str().expect("utf-8");
    let h = stdout(&run(&["measure", "--exe", exe_s]));
    // coreutils agrees.
    let sum = stdout(&Command::new("sha256sum").arg(&exe).output().expect("sha256sum"));
    assert_eq!(sum.split_whitespace().next(), Some(h.as_str()));
    let dom = stdout(&run(&["measure", "--kernel", exe_s, "--cmdline", "console=hvc0"]));
    assert_eq!(dom.len(), 64);
    assert_ne!(dom, h);

    assert_eq!(
        stdout(&xvtpm(&sock, &["group", "approved", "0"])),
        "none: the group's vTPMs may run with any boot hash"
    );
    assert_eq!(stdout(&xvtpm(&sock, &["group", "approve", "0", "--exe", exe_s])), format!("{h} approved"));
    assert_eq!(stdout(&xvtpm(&sock, &["group", "approve", "0", &h])), format!("{h} was approved already"));
    assert_eq!(stdout(&xvtpm(&sock, &["group", "approved", "0", "--json"])), format!("[\"{h}\"]"));
    assert_eq!(stdout(&xvtpm(&sock, &["group", "revoke", "0", &h])), format!("{h} revoked"));
    assert_eq!(stdout(&xvtpm(&sock, &["group", "revoke", "0", &h])), format!("{h} was not approved"));
    assert_eq!(xvtpm(&sock, &["group", "approve", "4", &h]).status.code(), Some(3), "no group 4");
    assert_eq!(xvtpm(&sock, &["group", "approve", "0", "12ab"]).status.code(), Some(1), "not a hash");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `xvtpm vtpm list | head -1`: the reader leaves early; the tool ends quietly (it used to
/// panic on the broken pipe).
#[test]
fn a_reader_that_closes_the_pipe_early_ends_the_tool_quietly() {
    let dir = std::env::temp_dir().join(format!("xvtpm-tools-epipe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (_tpm, sock) = manager(&dir);
    for _ in 0..3 {
        stdout(&xvtpm(&sock, &["vtpm", "provision"]));
    }
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let o =
        Command::new(XVTPM).args(["vtpm", "list", "--admin-socket"]).arg(&sock).stdout(writer).output().expect("xvtpm");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(o.status.code(), Some(0), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
