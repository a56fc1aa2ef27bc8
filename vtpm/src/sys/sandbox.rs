//! The sandbox a vtpm serves its guest from: its own uid and gids, no capabilities, a root
//! that holds only the directories it names, resource limits, and the system-call filter of
//! [`super::seccomp`]. Entered in two steps, because Linux moves only the calling thread into a
//! new mount namespace: [`unshare`] while the process has one thread, [`Sandbox::enter`] once it
//! has opened everything it needs from the host (Xen's devices, xenstore, its state, the
//! manager), before it reads a byte from its guest.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A directory the sandboxed process sees, at the same path as on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Visible {
    /// Its path.
    pub path: PathBuf,
    /// Mounted read-write (else read-only).
    pub writable: bool,
}

/// Who the process becomes and what it keeps seeing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// Its user id (never 0).
    pub uid: u32,
    /// Its group id (never 0).
    pub gid: u32,
    /// Its supplementary groups (e.g. the one the manager's socket belongs to).
    pub groups: Vec<u32>,
    /// The directories it sees; nothing else of the host's file system is there.
    pub visible: Vec<Visible>,
}

/// Files a sandboxed vtpm may have open: Xen's devices, xenstore, its state and lock, its
/// snapshots, the manager, the wake pipes; with room to spare, and far from what a leak of
/// descriptors could use to starve the host.
const MAX_FILES: u64 = 256;
/// The largest file it may write: its state files are a few hundred KiB at most.
const MAX_FILE_SIZE: u64 = 64 << 20;
/// Its threads (the limit counts every process and thread of its uid, which is its own).
const MAX_THREADS: u64 = 64;

/// A libc call's result: 0, or the error (errno) named with `what`.
pub(super) fn check(rc: impl Into<i64>, what: &str) -> io::Result<()> {
    if rc.into() == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    }
}

fn c_path(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::other(format!("{} has a NUL byte", p.display())))
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let src = src.map(c_path).transpose()?;
    let target_c = c_path(target)?;
    let fstype = fstype.map(|s| CString::new(s).map_err(io::Error::other)).transpose()?;
    let data = data.map(|s| CString::new(s).map_err(io::Error::other)).transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let rc = unsafe { libc::mount(ptr(&src), target_c.as_ptr(), ptr(&fstype), flags, ptr(&data).cast()) };
    check(rc, &format!("mount on {}", target.display()))
}

/// The number of threads of this process.
fn threads() -> io::Result<usize> {
    Ok(fs::read_dir("/proc/self/task")?.count())
}

/// Step one: a mount namespace of the process's own, whose mounts never reach the host's, and
/// empty IPC and network namespaces (no network, and no abstract Unix socket of the host's;
/// sockets with a path, xenstored's and the manager's, still connect). Must be called while the
/// process has one thread: every thread started after it shares the new namespaces.
pub fn unshare() -> io::Result<()> {
    let n = threads()?;
    if n != 1 {
        return Err(io::Error::other(format!(
            "the process already has {n} threads; the sandbox must be prepared first"
        )));
    }
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWNET;
    // SAFETY: unshare() takes flags only; the process is single-threaded, as it requires.
    check(unsafe { libc::unshare(flags) }, "unshare the mount, IPC and network namespaces")?;
    mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE, None)
}

impl Sandbox {
    /// Step two: the new root, the limits, the identity and the system-call filter, for every
    /// thread of the process. Irreversible; an error leaves the process unfit to serve (the
    /// caller exits).
    pub fn enter(&self) -> io::Result<()> {
        if self.uid == 0 || self.gid == 0 {
            return Err(io::Error::other("a sandbox runs as a user and group other than root"));
        }
        for v in self.visible.iter().filter(|v| v.writable) {
            give(&v.path, self.uid, self.gid)?;
        }
        self.new_root()?;
        limits()?;
        self.become_user()?;
        not_dumpable()?;
        // SAFETY: as above. No execve can give the process privileges back.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }, "PR_SET_NO_NEW_PRIVS")?;
        super::seccomp::apply()
    }

    /// The domain helper's confinement (see `xvtpm_xen::linux::helper`): the sandbox's identity,
    /// limits and a filter narrower than the vtpm's, which has no call that opens a file, so
    /// it needs no root of its own.
    pub fn confine_helper(&self) -> io::Result<()> {
        limits()?;
        self.become_user()?;
        not_dumpable()?;
        // SAFETY: as above.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }, "PR_SET_NO_NEW_PRIVS")?;
        super::seccomp::apply_helper()
    }

    /// A tmpfs root holding only the visible directories, bind-mounted at their own paths.
    fn new_root(&self) -> io::Result<()> {
        let mut visible = self.visible.clone();
        visible.sort_by(|a, b| a.path.cmp(&b.path));
        for pair in visible.windows(2) {
            if pair[1].path.starts_with(&pair[0].path) {
                return Err(io::Error::other(format!(
                    "{} is inside {}: each visible directory stands alone",
                    pair[1].path.display(),
                    pair[0].path.display()
                )));
            }
        }
        // Held before the tmpfs goes up: it may cover where they are (e.g. a state under /tmp).
        let sources: Vec<(OwnedFd, &Visible)> = visible
            .iter()
            .map(|v| {
                if !v.path.is_absolute() {
                    return Err(io::Error::other(format!("{} is not an absolute path", v.path.display())));
                }
                let f = fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
                    .open(&v.path)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", v.path.display())))?;
                Ok((OwnedFd::from(f), v))
            })
            .collect::<io::Result<_>>()?;
        let base = ["/tmp", "/run", "/mnt"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.is_dir())
            .ok_or_else(|| io::Error::other("no /tmp, /run or /mnt to build the sandbox's root on"))?;
        let quiet = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        mount(Some(Path::new("tmpfs")), base, Some("tmpfs"), quiet, Some("mode=0755,size=64k,nr_inodes=128"))?;
        for (fd, v) in &sources {
            let rel = v.path.strip_prefix("/").map_err(io::Error::other)?;
            let target = base.join(rel);
            let mut at = base.to_path_buf();
            for part in rel.components() {
                at.push(part);
                if !at.is_dir() {
                    fs::create_dir(&at)?;
                    // Whatever the umask: the sandboxed user must pass through.
                    fs::set_permissions(&at, fs::Permissions::from_mode(0o755))?;
                }
            }
            let src = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
            mount(Some(&src), &target, None, libc::MS_BIND | libc::MS_REC, None)?;
            let ro = if v.writable { 0 } else { libc::MS_RDONLY };
            mount(None, &target, None, libc::MS_BIND | libc::MS_REMOUNT | quiet | ro, None)?;
        }
        drop(sources);
        let base_c = c_path(base)?;
        // SAFETY: chdir with a NUL-terminated path.
        check(unsafe { libc::chdir(base_c.as_ptr()) }, "chdir to the new root")?;
        // pivot_root(".", "."): the old root ends up stacked under the new one.
        let dot = c".";
        // SAFETY: the pivot_root system call with two NUL-terminated paths; it changes the
        // root and working directory of every thread of this mount namespace, all ours.
        let rc = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
        if rc == 0 {
            // SAFETY: umount2 with a NUL-terminated path: detaches the old root, above us.
            check(unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) }, "detach the host's root")?;
        } else if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
            // The host runs from its initramfs (rootfs), which cannot be pivoted away from.
            move_root(base)?;
        } else {
            check(-1, "pivot_root")?;
        }
        // SAFETY: as for chdir above.
        check(unsafe { libc::chdir(c"/".as_ptr()) }, "chdir to /")?;
        // Nothing but the writable directories can be written.
        mount(None, Path::new("/"), None, libc::MS_BIND | libc::MS_REMOUNT | quiet | libc::MS_RDONLY, None)
    }

    /// The uid and gids, for every thread (glibc makes each thread take them); with them the
    /// capabilities go, since the new ids are not root's.
    fn become_user(&self) -> io::Result<()> {
        // SAFETY: setgroups reads `groups.len()` gids from a live slice.
        check(unsafe { libc::setgroups(self.groups.len(), self.groups.as_ptr()) }, "setgroups")?;
        // SAFETY: integer arguments only.
        check(unsafe { libc::setresgid(self.gid, self.gid, self.gid) }, "setresgid")?;
        // SAFETY: integer arguments only.
        check(unsafe { libc::setresuid(self.uid, self.uid, self.uid) }, "setresuid")?;
        // SAFETY: integer argument only; it must fail now.
        if unsafe { libc::setuid(0) } == 0 {
            return Err(io::Error::other("root could be regained after dropping it"));
        }
        Ok(())
    }
}

/// The new root where `pivot_root` cannot be used (the host's root is its initramfs): every
/// other mount of the namespace detached, the new root moved over `/` and made the root of
/// every thread (chroot; the threads share the process's file-system context). What stays
/// below is unreachable without the capabilities the sandbox drops next.
fn move_root(base: &Path) -> io::Result<()> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p != Path::new("/") && !p.starts_with(base))
        .collect();
    // Deepest first.
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let c = c_path(&p)?;
        // SAFETY: umount2 with a NUL-terminated path; a mount already gone with its parent
        // fails harmlessly.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    mount(Some(Path::new(".")), Path::new("/"), None, libc::MS_MOVE, None)?;
    // SAFETY: chroot with a NUL-terminated path.
    check(unsafe { libc::chroot(c".".as_ptr()) }, "chroot into the new root")
}

/// Gives `dir` and everything in it to `uid`:`gid` (what an earlier run as root, or a tool
/// run by root, left there must stay readable after the switch). Symbolic links are neither
/// followed nor changed.
fn give(dir: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let err = |p: &Path, e: io::Error| io::Error::new(e.kind(), format!("give {} to uid {uid}: {e}", p.display()));
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid)).map_err(|e| err(dir, e))?;
    for entry in fs::read_dir(dir).map_err(|e| err(dir, e))? {
        let path = entry.map_err(|e| err(dir, e))?.path();
        let meta = fs::symlink_metadata(&path).map_err(|e| err(&path, e))?;
        if meta.is_dir() {
            give(&path, uid, gid)?;
        } else if !meta.file_type().is_symlink() {
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid)).map_err(|e| err(&path, e))?;
        }
    }
    Ok(())
}

/// Not dumpable: no core file of a process that holds state keys, and no ptrace or /proc access
/// by another process of its uid. Set after the ids change, which resets the flag.
fn not_dumpable() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) }, "PR_SET_DUMPABLE")
}

/// Limits of its own: no core files, few descriptors, threads and bytes per file.
fn limits() -> io::Result<()> {
    for (resource, value, what) in [
        (libc::RLIMIT_CORE, 0, "RLIMIT_CORE"),
        (libc::RLIMIT_NOFILE, MAX_FILES, "RLIMIT_NOFILE"),
        (libc::RLIMIT_FSIZE, MAX_FILE_SIZE, "RLIMIT_FSIZE"),
        (libc::RLIMIT_NPROC, MAX_THREADS, "RLIMIT_NPROC"),
    ] {
        let lim = libc::rlimit { rlim_cur: value, rlim_max: value };
        // SAFETY: setrlimit reads one live rlimit.
        check(unsafe { libc::setrlimit(resource, &lim) }, what)?;
    }
    Ok(())
}
