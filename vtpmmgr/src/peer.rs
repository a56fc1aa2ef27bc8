//! What runs at the other end of a vTPM's connection: its boot hash. For a vTPM process on a
//! Unix socket, the SHA-256 of its executable, found through the socket's peer credentials;
//! for a vTPM domain, the SHA-256 of the kernel, ramdisk and command line it was built from.
//! The group's approved boot hashes are checked against it (Xen's manager checks the vTPM
//! domain's kernel the same way).
//!
//! What a socket approval holds against: an unapproved executable, and an approved one run
//! with code of someone else's (a library mapped from outside the system library directories,
//! as `LD_PRELOAD` or `LD_LIBRARY_PATH` bring in; anonymous executable memory; a tracer),
//! which then has no boot hash. The environment itself is not checked: a process can rewrite
//! what /proc shows of it, and a variable that loads nothing changes nothing (cargo sets
//! `LD_LIBRARY_PATH` for every test); what the loader mapped is what counts. What it cannot
//! hold against:
//! a process that connects and then hands the connection to other code (the descriptor
//! passed, or kept across a fork or an exec), a process rewriting its own memory, or anything
//! the peer's own uid can do to it. So the gate for a socket vTPM is its token together with
//! its uid ([`crate::dispatch::Caller::Socket`]): the first BIND records the uid, and only
//! that uid binds again; run each vTPM as its own user and keep its token readable by it
//! alone.

// The one unsafe call: getsockopt(SO_PEERCRED), which std offers only on nightly.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use sha2::{Digest, Sha256};

use xvtpm_xen::xenstore::{TxId, Xenstore};

use crate::BootHash;

/// The process id of the peer of `s`, as it was when it connected.
pub fn peer_pid(s: &UnixStream) -> io::Result<u32> {
    let (pid, _) = peer_cred(s)?;
    match u32::try_from(pid) {
        // 0: the peer is in a pid namespace we cannot see into.
        Ok(pid) if pid > 0 => Ok(pid),
        _ => Err(io::Error::new(io::ErrorKind::NotFound, "the peer's process is not visible from here")),
    }
}

/// The uid of the peer of `s` (the kernel's record, as it was when it connected).
pub fn peer_uid(s: &UnixStream) -> io::Result<u32> {
    peer_cred(s).map(|(_, uid)| uid)
}

fn peer_cred(s: &UnixStream) -> io::Result<(i32, u32)> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes for the duration of the call, and `len`
    // holds the size of `cred`, so the kernel writes at most that many bytes into it.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((cred.pid, cred.uid))
}

/// SHA-256 of the files' contents in order, then of `extra` (the boot hash of an executable
/// is that of its file alone).
pub fn measure(files: &[&Path], extra: &[u8]) -> io::Result<BootHash> {
    let mut h = Sha256::new();
    for f in files {
        io::copy(&mut std::fs::File::open(f)?, &mut h)?;
    }
    h.update(extra);
    Ok(h.finalize().into())
}

/// The boot hash of a domain built from `kernel`, `ramdisk` and `cmdline`:
/// SHA-256("xvtpm-domain" ‖ SHA-256(kernel) ‖ SHA-256(ramdisk) or 32 zeros ‖ cmdline). The
/// files are hashed separately so no byte can move from one to the other unnoticed.
pub fn measure_domain_image(kernel: &Path, ramdisk: Option<&Path>, cmdline: &str) -> io::Result<BootHash> {
    let k = measure(&[kernel], &[])?;
    let r = match ramdisk {
        Some(r) => measure(&[r], &[])?,
        None => [0; 32],
    };
    Ok(Sha256::new()
        .chain_update(b"xvtpm-domain")
        .chain_update(k)
        .chain_update(r)
        .chain_update(cmdline.as_bytes())
        .finalize()
        .into())
}

/// The boot hash of domain `domid`, from what libxl recorded when it built it
/// (`<vm>/image/kernel`, `image/ramdisk`, `image/cmdline`, where `<vm>` is the domain's
/// `vm` node; only the toolstack can write there). The files are read where this manager
/// runs, so this measures domains built in the manager's own domain (dom0).
pub fn measure_domain(xs: &Xenstore, domid: u16) -> Result<BootHash, String> {
    let read = |p: &str| xs.try_read(TxId::NONE, p).map_err(|e| format!("xenstore {p}: {e}"));
    let text = |v: Vec<u8>| String::from_utf8_lossy(&v).into_owned();
    let vm = read(&format!("/local/domain/{domid}/vm"))?.map(text).ok_or("the domain has no vm node")?;
    let kernel = read(&format!("{vm}/image/kernel"))?.map(text).ok_or("libxl recorded no kernel (not a PV domain?)")?;
    let ramdisk = read(&format!("{vm}/image/ramdisk"))?.map(text);
    let cmdline = read(&format!("{vm}/image/cmdline"))?.map(text).unwrap_or_default();
    measure_domain_image(Path::new(&kernel), ramdisk.as_deref().map(Path::new), &cmdline)
        .map_err(|e| format!("measuring {kernel}: {e}"))
}

/// Directories whose libraries an approved executable may map (Debian's: /lib is /usr/lib).
const SYSTEM_LIBS: &[&str] = &["/usr/lib/", "/usr/lib64/", "/lib/", "/lib64/"];

/// Why the process `pid` (running `exe`) may be running code other than its executable's and
/// the system's libraries: `Ok(None)` if nothing says so.
fn foreign_code(proc_dir: &Path, exe: &Path) -> io::Result<Option<String>> {
    let status = std::fs::read_to_string(proc_dir.join("status"))?;
    let tracer = status.lines().find_map(|l| l.strip_prefix("TracerPid:")).map(str::trim);
    if tracer.is_some_and(|t| t != "0") {
        return Ok(Some(format!("it is traced (by process {})", tracer.unwrap_or_default())));
    }
    for line in std::fs::read_to_string(proc_dir.join("maps"))?.lines() {
        // address perms offset dev inode [path]
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(perms) = fields.get(1) else { continue };
        if !perms.contains('x') {
            continue;
        }
        match fields.get(5) {
            None => return Ok(Some("it has anonymous executable memory".into())),
            Some(k) if k.starts_with('[') => {} // [vdso], [vsyscall]: the kernel's
            Some(path) if Path::new(path) == exe || SYSTEM_LIBS.iter().any(|d| path.starts_with(d)) => {}
            Some(path) => return Ok(Some(format!("it maps code from {path}"))),
        }
    }
    Ok(None)
}

/// The boot hash of the process at the other end of `s`: its executable's SHA-256, read
/// through `/proc/PID/exe` (the file the process runs, even if its path was replaced since).
/// `None`, logged, when it cannot be measured, or may run code of someone else's
/// ([`foreign_code`]): such a process counts as no approved executable.
pub fn measure_peer(s: &UnixStream) -> Option<BootHash> {
    let r = peer_pid(s).and_then(|pid| {
        let proc_dir = std::path::PathBuf::from(format!("/proc/{pid}"));
        let exe = std::fs::read_link(proc_dir.join("exe"))?;
        let h = measure(&[&proc_dir.join("exe")], &[])?;
        Ok((pid, h, foreign_code(&proc_dir, &exe)?))
    });
    match r {
        Ok((pid, h, None)) => {
            log::debug!("client pid {pid}: boot hash {}", crate::hex(&h));
            Some(h)
        }
        Ok((pid, h, Some(why))) => {
            log::warn!(
                "client pid {pid} runs executable {} but {why}: it has no boot hash (refused by groups with approvals)",
                crate::hex(&h)
            );
            None
        }
        Err(e) => {
            log::warn!("cannot measure a client's executable: {e}; it has no boot hash");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the process runs: its executable and system libraries only, or not.
    fn code_of(preload: Option<&Path>) -> Option<String> {
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("5");
        if let Some(p) = preload {
            cmd.env("LD_PRELOAD", p);
        }
        let mut child = cmd.spawn().expect("sleep");
        let dir = std::path::PathBuf::from(format!("/proc/{}", child.id()));
        let mut found = None;
        for _ in 0..200 {
            // Until the exec and the loader are done, /proc shows a process still starting.
            let maps = std::fs::read_to_string(dir.join("maps")).unwrap_or_default();
            let exe = std::fs::read_link(dir.join("exe")).expect("exe");
            if exe.ends_with("sleep") && maps.contains("libc.so") {
                found = foreign_code(&dir, &exe).expect("read");
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        found
    }

    #[test]
    fn code_from_outside_the_system_libraries_is_found() {
        assert_eq!(code_of(None), None, "plain sleep");
        let libm = Path::new("/usr/lib/x86_64-linux-gnu/libm.so.6");
        assert_eq!(code_of(Some(libm)), None, "a system library preloaded changes nothing here");
        let dir = std::env::temp_dir().join(format!("xvtpm-peer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let copy = dir.join("libm.so.6");
        std::fs::copy(libm, &copy).expect("copy");
        let found = code_of(Some(&copy));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            found.as_deref().is_some_and(|w| w.contains("maps code from") && w.contains("xvtpm-peer")),
            "{found:?}"
        );
    }

    #[test]
    fn the_peer_of_a_socket_pair_is_this_process() {
        let (a, _b) = UnixStream::pair().expect("socketpair");
        assert_eq!(peer_pid(&a).expect("peer"), std::process::id());
        let me = measure(&[Path::new("/proc/self/exe")], &[]).expect("measure");
        assert_eq!(measure_peer(&a), Some(me));
        let other = measure(&[Path::new("/proc/self/exe")], b"x").expect("measure");
        assert_ne!(me, other);
    }
}
