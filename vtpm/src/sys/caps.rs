//! A root daemon keeping only the capabilities it and the programs it starts need: the rest
//! leave its bounding set (so no child, root or not, ever has them) and its own sets.

use std::io;

use super::sandbox::check;

/// Capability numbers (linux/capability.h).
pub mod cap {
    /// Change file owners (a vTPM's state given to its uid).
    pub const CHOWN: u32 = 0;
    /// Read and write files whatever their modes (a vTPM's state, owned by its uid).
    pub const DAC_OVERRIDE: u32 = 1;
    /// Search directories whatever their modes.
    pub const DAC_READ_SEARCH: u32 = 2;
    /// Act on files owned by others (modes of directories made for the sandbox).
    pub const FOWNER: u32 = 3;
    /// Signal processes of other uids (the sandboxed vtpms).
    pub const KILL: u32 = 5;
    /// Become another group.
    pub const SETGID: u32 = 6;
    /// Become another user.
    pub const SETUID: u32 = 7;
    /// Change the bounding set (dropped last, by [`super::keep_only`] itself).
    pub const SETPCAP: u32 = 8;
    /// Lock memory (a hypercall buffer without /dev/xen/hypercall).
    pub const IPC_LOCK: u32 = 14;
    /// chroot (a sandbox's root where the host runs from its initramfs).
    pub const SYS_CHROOT: u32 = 18;
    /// Mount namespaces, mounts and pivot_root (a vtpm building its sandbox).
    pub const SYS_ADMIN: u32 = 21;
}

#[repr(C)]
struct Header {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const VERSION_3: u32 = 0x2008_0522;

/// Keeps only `keep` of this thread's capabilities, in its bounding, permitted and effective
/// sets; none inheritable or ambient. Call it before starting threads: each thread has its own
/// sets, and a thread started later copies the caller's.
pub fn keep_only(keep: &[u32]) -> io::Result<()> {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")?
        .trim()
        .parse()
        .map_err(|e| io::Error::other(format!("/proc/sys/kernel/cap_last_cap: {e}")))?;
    // SETPCAP last: dropping from the bounding set needs it.
    for c in (0..=last).filter(|c| *c != cap::SETPCAP).chain([cap::SETPCAP]) {
        // SAFETY: prctl with integer arguments only.
        let present = unsafe { libc::prctl(libc::PR_CAPBSET_READ, libc::c_ulong::from(c), 0, 0, 0) } == 1;
        // One already gone (e.g. under a unit's CapabilityBoundingSet) needs no SETPCAP.
        if present && !keep.contains(&c) {
            // SAFETY: prctl with integer arguments only.
            let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(c), 0, 0, 0) };
            check(rc, &format!("drop capability {c} from the bounding set"))?;
        }
    }
    let mut data = [Data::default(); 2];
    for &c in keep {
        let (word, bit) = ((c / 32) as usize, 1u32 << (c % 32));
        if let Some(d) = data.get_mut(word) {
            d.effective |= bit;
            d.permitted |= bit;
        }
    }
    let header = Header { version: VERSION_3, pid: 0 };
    // SAFETY: capset reads one header and, for version 3, two data structs, all live here.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr()) };
    check(rc, "capset")?;
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    check(rc, "clear the ambient capabilities")
}
