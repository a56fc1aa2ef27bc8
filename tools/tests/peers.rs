//! What a socket vTPM must be for the manager to hand it its key, tested against the attackers
//! of issue 19: a `vtpm` executable the group approved, run with a library of someone else's
//! (`LD_PRELOAD`), which used to pass as the approved executable; and another local user who
//! holds the vTPM's token.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

const XVTPM: &str = env!("CARGO_BIN_EXE_xvtpm");
const UUID: &str = "5e6f7081-92a3-44b5-86c7-d8e9f0a1b2c3";

fn xvtpm(admin: &Path, args: &[&str]) -> String {
    let o = Command::new(XVTPM).args(args).arg("--admin-socket").arg(admin).output().expect("xvtpm");
    assert!(o.status.success(), "xvtpm {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// `vtpm create` against the manager, in a fresh state directory.
fn create(vtpm: &Path, sock: &Path, token: &Path, state: &Path, setup: impl FnOnce(&mut Command)) -> Output {
    let mut c = Command::new(vtpm);
    c.arg("create").arg("--state-dir").arg(state).arg("--manager").arg(format!("unix:{}", sock.display()));
    c.args(["--vtpm-uuid", UUID]).arg("--token-file").arg(token);
    setup(&mut c);
    c.output().expect("vtpm create")
}

fn refused(o: &Output) -> bool {
    !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("the manager refused this vTPM")
}

#[test]
fn an_approved_vtpm_with_a_foreign_library_or_in_another_users_hands_is_refused() {
    let bins = xvtpm_tests::bins::vtpm_and_vtpmmgr(XVTPM);
    let dir = std::env::temp_dir().join(format!("xvtpm-peers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (p, sock, admin) = common::manager(&dir);

    // The vtpm executable, where any user can run it; its group approves exactly it.
    let vtpm = dir.join("vtpm");
    std::fs::copy(bins.join("vtpm"), &vtpm).expect("copy vtpm");
    let hash: String = Sha256::digest(std::fs::read(&vtpm).expect("read")).iter().map(|b| format!("{b:02x}")).collect();
    let group = xvtpm(&admin, &["group", "new"]).split_whitespace().next().expect("number").to_string();
    let token = dir.join("token");
    std::fs::write(&token, [9u8; 32]).expect("token");
    let t = token.to_str().expect("utf-8");
    xvtpm(&admin, &["vtpm", "provision", "--uuid", UUID, "--group", &group, "--token-file", t]);
    xvtpm(&admin, &["group", "approve", &group, &hash]);

    // A library from outside the system's, preloaded into the approved executable.
    let lib = dir.join("libm.so.6");
    std::fs::copy("/usr/lib/x86_64-linux-gnu/libm.so.6", &lib).expect("copy a library");
    let o = create(&vtpm, &sock, &token, &dir.join("preloaded"), |c| {
        c.env("LD_PRELOAD", &lib);
    });
    assert!(refused(&o), "an LD_PRELOADed approved vtpm got its key: {}", String::from_utf8_lossy(&o.stderr));
    // The approved executable as it is: served (and its uid is recorded).
    let o = create(&vtpm, &sock, &token, &dir.join("state"), |_| {});
    assert!(o.status.success(), "the approved vtpm: {}", String::from_utf8_lossy(&o.stderr));

    // Another user with the token (readable to them here) and the socket (opened to them):
    // refused, because the vTPM is bound to the uid of its first BIND.
    let uid = euid();
    if uid == 0 {
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).expect("chmod socket");
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("chmod token");
        let theirs = dir.join("theirs");
        std::fs::create_dir(&theirs).expect("dir");
        let chown = Command::new("chown").arg("65534:65534").arg(&theirs).status().expect("chown");
        assert!(chown.success());
        let o = create(&vtpm, &sock, &token, &theirs.join("state"), |c| {
            c.uid(65534).gid(65534);
        });
        assert!(refused(&o), "another user with the token got the key: {}", String::from_utf8_lossy(&o.stderr));
    }
    // The operator's way out of a wrong binding: bind it to another uid (root's vtpm is then
    // refused), or clear it (the next BIND records its uid again).
    xvtpm(&admin, &["vtpm", "bind-uid", UUID, "--uid", "65534"]);
    let o = create(&vtpm, &sock, &token, &dir.join("rebound"), |_| {});
    assert!(refused(&o), "bound to another uid, root's vtpm got the key");
    xvtpm(&admin, &["vtpm", "bind-uid", UUID, "--clear"]);
    let o = create(&vtpm, &sock, &token, &dir.join("cleared"), |_| {});
    assert!(!refused(&o), "a cleared binding still refused: {}", String::from_utf8_lossy(&o.stderr));
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
}

/// This process's effective uid, from /proc (no libc call needed).
fn euid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).expect("Uid line");
    uid.split_whitespace().nth(1).and_then(|u| u.parse().ok()).expect("euid")
}
