//! What runs at the other end of a vTPM's connection: its boot hash. For a vTPM process on a
//! Unix socket, the SHA-256 of its executable, found through the socket's peer credentials;
//! for a vTPM domain, the SHA-256 of the kernel, ramdisk and command line it was built from.
//! The group's approved boot hashes are checked against it (Xen's manager checks the vTPM
//! domain's kernel the same way).

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
    match u32::try_from(cred.pid) {
        // 0: the peer is in a pid namespace we cannot see into.
        Ok(pid) if pid > 0 => Ok(pid),
        _ => Err(io::Error::new(io::ErrorKind::NotFound, "the peer's process is not visible from here")),
    }
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

/// The boot hash of the process at the other end of `s`: its executable's SHA-256, read
/// through `/proc/PID/exe` (the file the process runs, even if its path was replaced since).
/// `None`, logged, when it cannot be measured.
pub fn measure_peer(s: &UnixStream) -> Option<BootHash> {
    let r = peer_pid(s).and_then(|pid| {
        let exe = format!("/proc/{pid}/exe");
        measure(&[Path::new(&exe)], &[]).map(|h| (pid, h))
    });
    match r {
        Ok((pid, h)) => {
            log::debug!("client pid {pid}: boot hash {}", crate::hex(&h));
            Some(h)
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
