//! The few signal operations a daemon needs: a stop flag set by SIGTERM/SIGINT, and sending
//! SIGTERM to a daemon by pid (the operator's tool stopping a container's vTPM).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

/// Makes SIGTERM and SIGINT set the returned flag instead of killing the process. Without
/// SA_RESTART, so a blocking wait is interrupted and the flag is seen at once.
pub fn stop_flag() -> io::Result<&'static AtomicBool> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: an all-zero sigaction is a valid value (empty mask, no flags) before the
        // fields are set.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: `sa` is a valid sigaction whose handler only stores to an atomic; the old
        // action is not asked for.
        let rc = unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(&STOP)
}

/// Sends SIGTERM to process `pid`.
pub fn terminate(pid: u32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    if pid <= 0 {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: kill() takes plain integers; a positive pid names one process.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
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
