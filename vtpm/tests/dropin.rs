//! `xvtpm-swtpm` installed as `swtpm` (a symlink), started with swtpm's own command line the way
//! tools written against swtpm start it: it creates the missing state, serves TPM 2.0, keeps
//! NV across a restart, and refuses a damaged state instead of replacing it.

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use xvtpm_tests::tpm2::{self, TcpTpm};

const DROPIN: &str = env!("CARGO_BIN_EXE_xvtpm-swtpm");

/// The tests of this file one at a time: two drop-ins started at once can be handed the same
/// free ports, and a test would then talk to the other's server.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `swtpm socket --tpm2 ...` through the symlink; an error (its exit status and stderr) if it
/// exited before listening.
fn swtpm(bin: &Path, state: &Path, port: u16, log: &Path) -> Result<Child, String> {
    swtpm_with(bin, &format!("dir={}", state.display()), port, log)
}

/// The drop-in in socket mode on `port` (data) and `port + 1` (control), stderr to `log`.
fn spawn(bin: &Path, tpmstate: &str, port: u16, log: &Path) -> Child {
    Command::new(bin)
        .arg("socket")
        .arg("--tpm2")
        .args(["--server", &format!("type=tcp,port={port}")])
        .args(["--ctrl", &format!("type=tcp,port={}", port + 1)])
        .args(["--tpmstate", tpmstate])
        .args(["--flags", "not-need-init,startup-clear"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("spawn swtpm")
}

/// [`swtpm`] with `--tpmstate` `tpmstate`.
fn swtpm_with(bin: &Path, tpmstate: &str, port: u16, log: &Path) -> Result<Child, String> {
    let mut child = spawn(bin, tpmstate, port, log);
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if let Some(st) = child.try_wait().expect("wait") {
            return Err(format!("{st}: {}", std::fs::read_to_string(log).unwrap_or_default()));
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(child);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("swtpm did not listen: {}", std::fs::read_to_string(log).unwrap_or_default());
}

/// Starts the drop-in on a state it must refuse, and waits for it to exit: its error output.
/// (Waiting for the port to open instead would race with other tests, whose servers may take
/// that port meanwhile.) Panics if it is still running after 20 s.
fn refused(bin: &Path, state: &Path, port: u16, log: &Path) -> String {
    let mut child = spawn(bin, &format!("dir={}", state.display()), port, log);
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if let Some(st) = child.try_wait().expect("wait") {
            assert!(!st.success(), "it exited successfully");
            return std::fs::read_to_string(log).unwrap_or_default();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("a damaged state must not start, and it still runs: {}", std::fs::read_to_string(log).unwrap_or_default());
}

/// The permanent-state file in `state`.
fn permall_in(state: &Path) -> std::path::PathBuf {
    let files: Vec<_> = std::fs::read_dir(state).expect("read state").flatten().map(|e| e.path()).collect();
    files
        .iter()
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().contains("permall")))
        .unwrap_or_else(|| panic!("no permanent state written: {files:?}"))
        .clone()
}

fn ok(t: &mut TcpTpm, cmd: &[u8]) -> Vec<u8> {
    let rsp = t.transmit(cmd).expect("transmit");
    assert_eq!(tpm2::rc(&rsp), 0, "command {:02x?} failed", &cmd[6..10]);
    rsp
}

#[test]
fn installed_as_swtpm_creates_serves_keeps_and_refuses_damage() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = std::env::temp_dir().join(format!("xvtpm-dropin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tempdir");
    let bin = dir.join("swtpm");
    symlink(DROPIN, &bin).expect("symlink");
    let state = dir.join("state");
    std::fs::create_dir(&state).expect("state dir");
    let log = dir.join("log");
    const NV: u32 = 0x0150_0016;

    // An empty state directory: created, as swtpm does.
    let port = common::free_ports();
    let mut child = swtpm(&bin, &state, port, &log).expect("first start");
    let mut t = TcpTpm::connect(port).expect("connect");
    let rsp = ok(&mut t, &tpm2::get_random(32));
    assert_eq!(rsp.len(), 10 + 2 + 32);
    ok(&mut t, &tpm2::nv_define(NV, 8));
    ok(&mut t, &tpm2::nv_write(NV, b"dropin!!"));
    drop(t);
    let _ = child.kill();
    let _ = child.wait();
    let permall = permall_in(&state);

    // Restarted (kill -9 above): the NV index is still there.
    let port = common::free_ports();
    let mut child = swtpm(&bin, &state, port, &log).expect("restart");
    let mut t = TcpTpm::connect(port).expect("connect");
    let rsp = ok(&mut t, &tpm2::nv_read(NV, 8));
    assert_eq!(tpm2::nv_read_data(&rsp), Some(&b"dropin!!"[..]));
    drop(t);
    let _ = child.kill();
    let _ = child.wait();

    // One flipped byte: it refuses to start, names the file, and leaves it as it was.
    let mut bytes = std::fs::read(&permall).expect("read permall");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&permall, &bytes).expect("damage");
    let port = common::free_ports();
    let err = refused(&bin, &state, port, &log);
    assert!(err.contains(&permall.display().to_string()), "the error names the file: {err}");
    assert_eq!(std::fs::read(&permall).expect("reread"), bytes, "the damaged state was rewritten");
    let _ = std::fs::remove_dir_all(&dir);
}

fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777
}

/// Whether user `uid` can read `path` (by running `cat` as that user; needs root).
fn readable_by(uid: u32, path: &Path) -> bool {
    use std::os::unix::process::CommandExt;
    Command::new("cat")
        .arg(path)
        .uid(uid)
        .gid(uid)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run cat")
        .success()
}

/// `--tpmstate dir=D,mode=0600` (which used to be parsed and ignored: files were 0644 in a
/// 0755 directory, and with no --key, the drop-in's default, any local user read the TPM's
/// seeds): the state is 0600 in a 0700 directory and another user cannot read it; without
/// `mode=`, swtpm's 0640.
#[test]
fn state_files_get_the_mode_asked_for_and_another_user_cannot_read_them() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = std::env::temp_dir().join(format!("xvtpm-dropin-mode-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tempdir");
    // Where another user could reach the files if their own bits let them.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let bin = dir.join("swtpm");
    symlink(DROPIN, &bin).expect("symlink");
    let state = dir.join("state");
    let log = dir.join("log");
    let port = common::free_ports();
    let mut child = swtpm_with(&bin, &format!("dir={},mode=0600", state.display()), port, &log).expect("start");
    let mut t = TcpTpm::connect(port).expect("connect");
    ok(&mut t, &tpm2::nv_define(0x0150_0017, 8));
    drop(t);
    let _ = child.kill();
    let _ = child.wait();
    let permall = permall_in(&state);
    assert_eq!(mode_of(&state), 0o700, "the state directory the drop-in made");
    assert_eq!(mode_of(&permall), 0o600);
    let is_root = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
    if is_root {
        // Even with the directory opened up, the file's own bits keep user nobody out.
        std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        assert!(!readable_by(65534, &permall), "another user read the state");
        std::fs::set_permissions(&permall, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("chmod");
        assert!(readable_by(65534, &permall), "the check can fail: a 0644 file is readable");
    }
    // No mode=: swtpm's default, 0640, for existing files too.
    let port = common::free_ports();
    let mut child = swtpm(&bin, &state, port, &log).expect("restart");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(mode_of(&permall), 0o640);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_idle_socket_vtpm_with_a_connected_client_never_wakes() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = std::env::temp_dir().join(format!("xvtpm-dropin-idle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tempdir");
    let bin = dir.join("swtpm");
    symlink(DROPIN, &bin).expect("symlink");
    let port = common::free_ports();
    let mut child = swtpm(&bin, &dir.join("state"), port, &dir.join("log")).expect("start");
    let mut t = TcpTpm::connect(port).expect("connect");
    // Back to back first, so the data channel is polling for the next command when we stop.
    for _ in 0..50 {
        ok(&mut t, &tpm2::get_random(16));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (before, threads_before) = xvtpm_tests::procstat::wakeups(child.id());
    std::thread::sleep(Duration::from_secs(5));
    let (after, threads_after) = xvtpm_tests::procstat::wakeups(child.id());
    ok(&mut t, &tpm2::get_random(16));
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        after - before,
        0,
        "the idle server woke; per thread before {threads_before:?}, after {threads_after:?}"
    );
}
