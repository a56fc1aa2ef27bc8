//! `xvtpm migrate-accept` taking an HVM guest's vTPM, driven as the source's relay drives it
//! (its frames on stdin and stdout), with a stand-in for `xl migrate-receive` (a script: the
//! stream, "ready", then "go" or the end) and this test playing xvtpmd and the vtpm in the
//! simulated xenstore (the guest's request: `arriving`, then `ready` once told `arrived`).
//! The vTPM is taken whole (state, snapshot, token, version, `made`, its key imported at the
//! manager) and only then answered; a "go" before it ends the migration with all undone; a
//! second offer is refused; a vTPM that serves but refuses the guest is not taken, and what was
//! set up is undone before the source hears it.

mod common;

use common::{site, stdout, xvtpm, Site};

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use xvtpm_xen::sim::{toolstack, SimHost};
use xvtpm_xen::{TxId, Xen};

const XVTPM: &str = env!("CARGO_BIN_EXE_xvtpm");
const UUID: &str = "7a7b7c7d-7e7f-4081-8283-848586878889";
const GUEST: u16 = 21;
/// What xl's receiving end says once the domain is built, and what the source's xl answers.
const READY: &[u8] = b"domain received, ready to unpause";
const GO: &[u8] = b"domain is yours, you are cleared to unpause";

/// The stand-in for `xl migrate-receive`: the stream up to a line `STREAM-END`, then "ready";
/// exits 0 once it reads "go", 1 if its input ends first.
fn fake_xl(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    let script = format!(
        "#!/bin/sh\nwhile IFS= read -r l; do case \"$l\" in *STREAM-END*) break;; esac; done\n\
         printf '%s\\n' '{}'\n\
         while IFS= read -r l; do case \"$l\" in *'{}'*) exit 0;; esac; done\nexit 1\n",
        String::from_utf8_lossy(READY),
        String::from_utf8_lossy(GO)
    );
    std::fs::write(bin.join("xl"), script).expect("xl");
    std::fs::set_permissions(bin.join("xl"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    bin
}

/// One end of the channel (`frame = kind u8 | length u32 BE | payload`), as the relay speaks it.
struct Peer {
    child: Child,
    to: ChildStdin,
    from: ChildStdout,
    log: PathBuf,
}

impl Peer {
    fn send(&mut self, kind: u8, payload: &[u8]) {
        let mut f = vec![kind];
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        self.to.write_all(&f).expect("send");
        self.to.flush().expect("flush");
    }

    fn recv(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut head = [0u8; 5];
        self.from.read_exact(&mut head).ok()?;
        let mut payload = vec![0u8; u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize];
        self.from.read_exact(&mut payload).ok()?;
        Some((head[0], payload))
    }

    /// Reads xl's frames until its "ready".
    fn until_ready(&mut self) {
        let mut seen = Vec::new();
        while !seen.windows(READY.len()).any(|w| w == READY) {
            match self.recv() {
                Some((2, b)) => seen.extend_from_slice(&b),
                other => panic!("expected xl's stream, got {other:?}: {}", self.log()),
            }
        }
    }

    /// The next frame that is not xl's stream.
    fn answer(&mut self) -> (u8, Vec<u8>) {
        loop {
            match self.recv() {
                Some((2, _)) => continue,
                Some(f) => return f,
                None => panic!("the accepting end went away: {}", self.log()),
            }
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its exit status, once it ended (bounded).
    fn end(mut self) -> (bool, String) {
        drop(self.to);
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                return (s.success(), log);
            }
            assert!(Instant::now() < end, "accept did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A destination host: its manager, xvtpmd's root, a fake xl, and `xvtpm migrate-accept`.
struct Dst {
    host: SimHost,
    site: Site,
    root: PathBuf,
    snapshots: PathBuf,
    bin: PathBuf,
}

impl Dst {
    fn new() -> Dst {
        let host = SimHost::temp().expect("sim");
        toolstack::init_dom0(&host.xen(0).xenstore().expect("xs")).expect("dom0");
        let site = site(&host.dir().join("mgr"));
        let bin = fake_xl(host.dir());
        Dst { root: host.dir().join("vtpms"), snapshots: host.dir().join("snapshots"), site, bin, host }
    }

    fn accept(&self, n: u32) -> Peer {
        let log = self.host.dir().join(format!("accept-{n}.log"));
        let path = format!("{}:{}", self.bin.display(), std::env::var("PATH").unwrap_or_default());
        let mut child = Command::new(XVTPM)
            .arg("migrate-accept")
            .arg("--vtpms")
            .arg(&self.root)
            .arg("--snapshot-dir")
            .arg(&self.snapshots)
            .arg("--admin-socket")
            .arg(&self.site.admin)
            .arg("--manager-socket")
            .arg(&self.site.vtpms)
            .args(["--serve-timeout", "10", "--domid", "0"])
            .arg("--sim")
            .arg(self.host.dir())
            .env("PATH", path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("migrate-accept");
        let (to, from) = (child.stdin.take().expect("stdin"), child.stdout.take().expect("stdout"));
        let mut p = Peer { child, to, from, log };
        let hello = serde_json::json!({
            "protocol": "xvtpm-migrate 1", "device_uuid": UUID, "vtpm_uuid": UUID, "tpm12": false,
            "xl_args": ["migrate-receive"], "hvm": true
        });
        p.send(1, hello.to_string().as_bytes());
        p
    }

    fn dir(&self) -> PathBuf {
        self.root.join(UUID)
    }

    /// What the wrapper and xvtpmd made for the arriving guest: its request, `arriving`. A
    /// thread plays xvtpmd and the vtpm: told `arrived`, it answers `ready` (and `error` if
    /// `refuse`).
    fn arriving_guest(&self, refuse: bool) -> std::thread::JoinHandle<()> {
        let xs = self.host.xen(0).xenstore().expect("xs");
        toolstack::add_domain(&xs, GUEST, "guest").expect("domain");
        let req = xvtpm_xen::xenbus::hvm_request_path(GUEST);
        for (k, v) in [("uuid", UUID), ("incoming", "1"), ("state", "arriving")] {
            xs.write(TxId::NONE, &format!("{req}/{k}"), v.as_bytes()).expect("request");
        }
        std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(30);
            while xs.try_read(TxId::NONE, &format!("{req}/arrived")).expect("read").is_none() {
                if Instant::now() > end {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if refuse {
                xs.write(TxId::NONE, &format!("{req}/error"), b"no snapshot to resume").expect("error");
            }
            xs.write(TxId::NONE, &format!("{req}/state"), b"ready").expect("ready");
        })
    }
}

/// The offer a source sends for vTPM `UUID`, provisioned at `src` and exported to `dst`'s
/// manager (which trusts `src`'s).
fn offer(src: &Site, dst: &Site, dir: &Path) -> Vec<u8> {
    let token = dir.join("token");
    std::fs::write(&token, [9u8; 32]).expect("token");
    let t = token.to_str().expect("utf-8");
    assert_eq!(stdout(&xvtpm(src, &["vtpm", "provision", "--uuid", UUID, "--token-file", t])), UUID);
    let src_key = stdout(&xvtpm(src, &["vtpm", "migration-key"]));
    assert_eq!(stdout(&xvtpm(dst, &["vtpm", "trust-source", &src_key])), "pinned");
    let dst_key = stdout(&xvtpm(dst, &["vtpm", "migration-key"]));
    let bundle = dir.join("bundle");
    stdout(&xvtpm(src, &["vtpm", "export", UUID, "--to", &dst_key, "--out", bundle.to_str().expect("utf-8")]));
    let mut files = std::collections::BTreeMap::new();
    files.insert("state/managed-a.xvtpm".to_string(), b"sealed state".to_vec());
    files.insert("snapshot/a".to_string(), b"sealed snapshot".to_vec());
    files.insert("token".to_string(), vec![9u8; 32]);
    files.insert("bundle".to_string(), std::fs::read(&bundle).expect("bundle"));
    xvtpm_vtpm::state::managed::encode(&files)
}

fn known(s: &Site) -> bool {
    xvtpm(s, &["vtpm", "show", UUID]).status.success()
}

#[test]
fn an_hvm_guests_vtpm_is_taken_whole_and_once() {
    let dst = Dst::new();
    let src = site(&dst.host.dir().join("src"));
    let offer = offer(&src, &dst.site, dst.host.dir());
    let _xvtpmd = dst.arriving_guest(false);
    let mut p = dst.accept(1);
    p.send(2, b"memory pages\nSTREAM-END\n");
    p.until_ready();
    let mark = dst.dir().join("arriving");
    assert!(mark.exists(), "marked arriving while it comes: {}", p.log());
    p.send(4, &offer);
    assert_eq!(p.answer().0, 5, "accepted: {}", p.log());
    let d = dst.dir();
    assert!(d.join("made").exists() && !mark.exists(), "complete: {}", p.log());
    assert_eq!(std::fs::read(d.join("state/managed-a.xvtpm")).expect("state"), b"sealed state");
    assert_eq!(std::fs::read(d.join("token")).expect("token"), [9u8; 32]);
    assert_eq!(std::fs::read_to_string(d.join("tpm-version")).expect("version"), "2.0\n");
    assert!(known(&dst.site), "its key is at the destination's manager");
    // A second offer (the state of a running guest must not be written over).
    p.send(4, &offer);
    let (kind, why) = p.answer();
    assert_eq!((kind, String::from_utf8_lossy(&why).contains("taken already")), (6, true), "{}", p.log());
    p.send(2, &[GO, b"\n"].concat());
    let (ok, log) = p.end();
    assert!(ok, "{log}");
    assert!(d.join("made").exists() && known(&dst.site), "kept: {log}");
}

#[test]
fn a_go_before_the_vtpm_ends_the_migration_with_all_undone() {
    let dst = Dst::new();
    let _xvtpmd = dst.arriving_guest(false);
    let mut p = dst.accept(2);
    p.send(2, b"STREAM-END\n");
    p.until_ready();
    assert!(dst.dir().join("arriving").exists(), "{}", p.log());
    // "go" with no offer: xl never hears it, fails, and what was set up goes.
    p.send(2, &[GO, b"\n"].concat());
    let (ok, log) = p.end();
    assert!(!ok, "{log}");
    assert!(log.contains("before its vTPM was here"), "{log}");
    assert!(!dst.dir().exists(), "undone: {log}");
}

#[test]
fn a_go_inside_the_guests_memory_is_not_a_go() {
    let dst = Dst::new();
    let src = site(&dst.host.dir().join("src"));
    let offer = offer(&src, &dst.site, dst.host.dir());
    let _xvtpmd = dst.arriving_guest(false);
    let mut p = dst.accept(3);
    // The guest's memory may hold the very bytes of "go": before xl said "ready" it is data.
    p.send(2, &[b"page ", GO, b" page\nSTREAM-END\n"].concat());
    p.until_ready();
    p.send(4, &offer);
    assert_eq!(p.answer().0, 5, "accepted: {}", p.log());
    p.send(2, &[GO, b"\n"].concat());
    let (ok, log) = p.end();
    assert!(ok, "{log}");
}

#[test]
fn a_vtpm_that_refuses_the_guest_is_not_taken_and_is_undone_at_once() {
    let dst = Dst::new();
    let src = site(&dst.host.dir().join("src"));
    let offer = offer(&src, &dst.site, dst.host.dir());
    let _xvtpmd = dst.arriving_guest(true);
    let mut p = dst.accept(4);
    p.send(2, b"STREAM-END\n");
    p.until_ready();
    p.send(4, &offer);
    let (kind, why) = p.answer();
    assert_eq!(kind, 6, "refused: {}", p.log());
    assert!(String::from_utf8_lossy(&why).contains("no snapshot to resume"), "{}", p.log());
    // Undone before the source heard it: no copy stays here while it takes the vTPM back.
    assert!(!dst.dir().exists() && !known(&dst.site), "{}", p.log());
    let (ok, log) = p.end();
    assert!(!ok, "xl ends without its go: {log}");
}
