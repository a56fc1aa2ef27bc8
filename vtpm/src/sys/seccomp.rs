//! The system calls a sandboxed vtpm may make once it serves: what its threads, memory, files
//! in the directories it sees, Unix sockets and Xen's devices need, and nothing that reaches
//! another process, the network, the file system's layout or its own privileges. Any other
//! call kills the whole process (SIGSYS); its supervisor logs that and starts it again.

use std::collections::BTreeMap;
use std::io;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// Calls allowed with any arguments.
const PLAIN: &[libc::c_long] = &[
    // Memory.
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mlock,
    libc::SYS_munlock,
    // Threads, and what glibc and std do in them.
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    // Descriptors: files in the directories the sandbox shows, pipes, eventfds, sockets.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_openat,
    libc::SYS_mkdirat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_getdents64,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fcntl,
    libc::SYS_flock,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_eventfd2,
    libc::SYS_ppoll,
    libc::SYS_readlinkat,
    // Sockets of the kind `socket` allows: xenstored and the manager.
    libc::SYS_connect,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
];

/// The ioctls the vtpm makes once it serves: event channels and grant mapping on the handles it
/// holds, and std's non-blocking and close-on-exec switches. Not a terminal's (TIOCSTI would
/// type into a root shell whose terminal a hand-started vtpm inherited).
fn vtpm_ioctls() -> Vec<u32> {
    use xvtpm_xen::linux::ioctl as x;
    vec![
        x::IOCTL_EVTCHN_BIND_INTERDOMAIN,
        x::IOCTL_EVTCHN_UNBIND,
        x::IOCTL_EVTCHN_NOTIFY,
        x::IOCTL_EVTCHN_RESET,
        x::IOCTL_GNTDEV_MAP_GRANT_REF,
        x::IOCTL_GNTDEV_UNMAP_GRANT_REF,
        x::IOCTL_GNTDEV_SET_UNMAP_NOTIFY,
        libc::FIONBIO as u32,
        libc::FIOCLEX as u32,
    ]
}

/// `ioctl` with one of `requests` (its second argument).
fn ioctl_rules(requests: &[u32]) -> io::Result<Vec<SeccompRule>> {
    requests.iter().map(|&r| SeccompRule::new(vec![arg_eq(1, u64::from(r))?]).map_err(io::Error::other)).collect()
}

/// The x86-64 names of calls that other architectures only have in their `*at` forms.
#[cfg(target_arch = "x86_64")]
const LEGACY: &[libc::c_long] = &[
    libc::SYS_poll,
    libc::SYS_open,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_access,
    libc::SYS_rename,
    libc::SYS_unlink,
    libc::SYS_mkdir,
    libc::SYS_readlink,
    libc::SYS_pipe,
    libc::SYS_eventfd,
    libc::SYS_dup2,
];
#[cfg(not(target_arch = "x86_64"))]
const LEGACY: &[libc::c_long] = &[];

fn arg_eq(arg: u8, value: u64) -> io::Result<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value).map_err(io::Error::other)
}

/// The filter, for this process (`pid`: the one process `tgkill` may signal).
fn filter(pid: u32) -> io::Result<BpfProgram> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = PLAIN.iter().chain(LEGACY).map(|&n| (n, vec![])).collect();
    let rule = |conds: Vec<SeccompCondition>| SeccompRule::new(conds).map_err(io::Error::other);
    // New threads only (their flags carry CLONE_THREAD); never a new process.
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(thread), thread)
            .map_err(io::Error::other)?])?],
    );
    rules.insert(libc::SYS_ioctl, ioctl_rules(&vtpm_ioctls())?);
    // Unix sockets only.
    rules.insert(libc::SYS_socket, vec![rule(vec![arg_eq(0, libc::AF_UNIX as u64)?])?]);
    // Naming a thread, nothing else of prctl.
    rules.insert(libc::SYS_prctl, vec![rule(vec![arg_eq(0, libc::PR_SET_NAME as u64)?])?]);
    // Signals to its own threads (abort()), never to another process.
    rules.insert(libc::SYS_tgkill, vec![rule(vec![arg_eq(0, u64::from(pid))?])?]);
    // clone3's flags sit in memory a filter cannot read: allowed here, and answered "not
    // implemented" by the second filter (the stricter answer wins), so glibc uses clone.
    rules.insert(libc::SYS_clone3, vec![]);
    build(rules, SeccompAction::KillProcess, SeccompAction::Allow)
}

fn build(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> io::Result<BpfProgram> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(io::Error::other)?;
    let f = SeccompFilter::new(rules, mismatch, matched, arch).map_err(io::Error::other)?;
    f.try_into().map_err(io::Error::other)
}

/// What the domain helper (`xvtpm_xen::linux::helper`) may call: its socket, the hypercall
/// ioctl on the privcmd handle it holds, the page that carries the hypercall's argument, and
/// its log line. It is single-threaded and opens nothing.
const HELPER: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    // std reads and writes a socket with recv and send.
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    // Waiting for the vtpm or xenstored.
    #[cfg(target_arch = "x86_64")]
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_writev,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mlock,
    libc::SYS_munlock,
    libc::SYS_brk,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_clock_gettime,
    libc::SYS_close,
    libc::SYS_rt_sigreturn,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Installs the domain helper's filter (single-threaded: this thread is the process).
pub fn apply_helper() -> io::Result<()> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = HELPER.iter().map(|&n| (n, vec![])).collect();
    // The hypercall ioctl on privcmd, nothing else.
    rules.insert(libc::SYS_ioctl, ioctl_rules(&[xvtpm_xen::linux::ioctl::IOCTL_PRIVCMD_HYPERCALL])?);
    let prog = build(rules, SeccompAction::KillProcess, SeccompAction::Allow)?;
    seccompiler::apply_filter(&prog).map_err(|e| io::Error::other(format!("seccomp: {e}")))
}

/// Installs the filter on every thread of the process.
pub fn apply() -> io::Result<()> {
    let allowed = filter(std::process::id())?;
    let no_clone3 = build(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?;
    // The allow-list last: installing a filter takes calls (prctl, seccomp) it forbids.
    for prog in [no_clone3, allowed] {
        seccompiler::apply_filter_all_threads(&prog).map_err(|e| io::Error::other(format!("seccomp: {e}")))?;
    }
    Ok(())
}
