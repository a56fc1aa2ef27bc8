//! The few signal operations a daemon needs: a stop flag set by SIGTERM/SIGINT, SIGUSR1 to
//! cancel the TPM command in progress, and sending SIGTERM to a daemon by pid (the operator's
//! tool stopping a container's vTPM).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use crate::engine::Canceller;

static STOP: AtomicBool = AtomicBool::new(false);

/// The write end of the pipe the stop signals wake [`on_stop`]'s thread through.
static STOP_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_stop_signal(_: libc::c_int) {
    // An atomic store and write(): async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
    wake_pipe(&STOP_PIPE);
}

/// Writes one byte to the pipe whose write end `pipe` holds, if any; from a signal handler.
fn wake_pipe(pipe: &AtomicI32) {
    let fd = pipe.load(Ordering::SeqCst);
    if fd >= 0 {
        let b = 1u8;
        // SAFETY: __errno_location() returns this thread's errno, valid for the thread's life;
        // saved and restored so the interrupted code never sees the handler's errno.
        let errno = unsafe { *libc::__errno_location() };
        // SAFETY: write() is async-signal-safe; `b` is one readable byte. The write end is
        // non-blocking: a full pipe (wakes already pending) fails at once and loses nothing
        // worth keeping, where a blocking write would hang the handler for good.
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
        // SAFETY: as above.
        unsafe { *libc::__errno_location() = errno };
    }
}

/// A pipe whose write end (non-blocking) goes to `slot`, for a signal handler; its read end.
fn signal_pipe(slot: &AtomicI32) -> io::Result<File> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 just made both descriptors; nothing else owns them. Owned from here, so an
    // error below closes them.
    let (reader, writer) = unsafe { (File::from_raw_fd(fds[0]), std::os::fd::OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on the write end pipe2 just made; F_SETFL takes an int.
    if unsafe { libc::fcntl(writer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // The handler writes to it for the rest of the process's life.
    slot.store(std::os::fd::IntoRawFd::into_raw_fd(writer), Ordering::SeqCst);
    Ok(reader)
}

/// Like [`stop_flag`], and calls `f` (on a thread of its own, blocked until then) when a stop
/// signal arrives: for loops that wait without a timeout and must be woken to see the flag.
/// Once per process.
pub fn on_stop(f: impl Fn() + Send + 'static) -> io::Result<&'static AtomicBool> {
    if STOP_PIPE.load(Ordering::SeqCst) >= 0 {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, "on_stop was already called"));
    }
    let mut reader = signal_pipe(&STOP_PIPE)?;
    let flag = stop_flag()?;
    std::thread::Builder::new().name("stop-signal".into()).spawn(move || {
        let mut b = [0u8; 16];
        loop {
            match reader.read(&mut b) {
                Ok(0) => return,
                Ok(_) => f(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::error!("stop signal pipe: {e}");
                    return;
                }
            }
        }
    })?;
    Ok(flag)
}

/// Makes SIGTERM and SIGINT set the returned flag instead of killing the process. Without
/// SA_RESTART, so a blocking wait is interrupted and the flag is seen at once.
pub fn stop_flag() -> io::Result<&'static AtomicBool> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: an all-zero sigaction is a valid value (empty mask, no flags) before the
        // fields are set.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: `sa` is a valid sigaction whose handler stores to an atomic and may write()
        // one byte (saving and restoring errno): all async-signal-safe. The old action is not
        // asked for.
        let rc = unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(&STOP)
}

/// The write end of the pipe SIGUSR1's handler wakes the cancelling thread through.
static CANCEL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_cancel_signal(_: libc::c_int) {
    wake_pipe(&CANCEL_PIPE);
}

/// Makes SIGUSR1 call `cancel` (from a thread of its own, not from the handler): the command
/// the TPM runs stops early with a cancelled response, as swtpm's CANCEL_TPM_CMD does. The
/// kernel's vTPM proxy forwards no cancellation, so this is how one reaches the engine.
pub fn cancel_on_sigusr1(cancel: Canceller) -> io::Result<()> {
    relay(libc::SIGUSR1, &CANCEL_PIPE, on_cancel_signal, "sigusr1-cancel", move || {
        log::info!("SIGUSR1: cancelling the TPM command in progress");
        cancel();
    })
}

/// The write end of the pipe SIGUSR2's handler wakes its thread through.
static USR2_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_usr2_signal(_: libc::c_int) {
    wake_pipe(&USR2_PIPE);
}

/// Makes SIGUSR2 call `f` from a thread of its own: how xvtpmd tells a sandboxed HVM guest's
/// vtpm (which may not ask Xen) that its guest's domain suspended.
pub fn on_sigusr2(f: impl Fn() + Send + 'static) -> io::Result<()> {
    relay(libc::SIGUSR2, &USR2_PIPE, on_usr2_signal, "sigusr2", f)
}

/// Installs `handler` (which wakes `pipe`) for `signal`, and a thread that calls `f` for each.
fn relay(
    signal: libc::c_int,
    pipe: &'static AtomicI32,
    handler: extern "C" fn(libc::c_int),
    name: &str,
    f: impl Fn() + Send + 'static,
) -> io::Result<()> {
    let mut reader = signal_pipe(pipe)?;
    // SAFETY: an all-zero sigaction is a valid value before the fields are set.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = handler as libc::sighandler_t;
    sa.sa_flags = libc::SA_RESTART;
    // SAFETY: `sa` is a valid sigaction whose handler only loads an atomic and calls write().
    if unsafe { libc::sigaction(signal, &sa, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std::thread::Builder::new().name(name.into()).spawn(move || {
        let mut b = [0u8; 16];
        loop {
            match reader.read(&mut b) {
                Ok(0) => return,
                Ok(_) => f(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::error!("signal pipe: {e}");
                    return;
                }
            }
        }
    })?;
    Ok(())
}

/// Sends SIGTERM to process `pid`.
pub fn terminate(pid: u32) -> io::Result<()> {
    signal(pid, libc::SIGTERM)
}

/// Sends `sig` to process `pid`.
pub fn signal(pid: u32, sig: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    if pid <= 0 {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: kill() takes plain integers; a positive pid names one process.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminating_a_missing_process_is_an_error() {
        assert!(terminate(0).is_err());
        assert!(terminate(u32::MAX).is_err());
    }

    #[test]
    fn sigusr1_calls_the_canceller() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::Arc;
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        cancel_on_sigusr1(Arc::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        }))
        .expect("handler");
        // The handler's pipe never blocks it: a full pipe must not hang a signalled thread.
        // SAFETY: F_GETFL on the descriptor the handler writes to.
        let flags = unsafe { libc::fcntl(CANCEL_PIPE.load(Ordering::SeqCst), libc::F_GETFL) };
        assert!(flags >= 0 && flags & libc::O_NONBLOCK != 0, "flags {flags:#x}");
        // SAFETY: signalling this process with a signal whose handler was just installed.
        assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGUSR1) }, 0);
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while calls.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < end, "canceller not called");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn sigterm_sets_the_flag() {
        let flag = stop_flag().expect("handlers");
        terminate(std::process::id()).expect("signal self");
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !flag.load(Ordering::SeqCst) {
            assert!(std::time::Instant::now() < end, "flag not set");
            std::thread::yield_now();
        }
    }
}
