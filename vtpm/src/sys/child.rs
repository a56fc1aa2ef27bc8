//! Waiting for a child process to end without reaping it, so that its pid stays its own (and
//! may still be signalled safely) until the owner of its `Child` reaps it.

use std::io;

/// Blocks until child `pid` has ended, leaving it unreaped (a zombie) for `Child::wait`.
pub fn wait_exited(pid: u32) -> io::Result<()> {
    let id = libc::id_t::from(pid);
    loop {
        // SAFETY: a zeroed siginfo_t is a valid out-parameter for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid with a pointer to our own siginfo_t; WNOWAIT leaves the child
        // waitable, so this takes nothing from the `Child` that owns it.
        let rc = unsafe { libc::waitid(libc::P_PID, id, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ended_child_stays_waitable() {
        let mut c = std::process::Command::new("true").spawn().expect("true");
        wait_exited(c.id()).expect("ended");
        assert!(c.wait().expect("still reapable").success());
    }
}
