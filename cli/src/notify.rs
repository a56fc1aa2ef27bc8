//! systemd's readiness protocol (`sd_notify(3)`): a `Type=notify` service sends `READY=1` in
//! a datagram to the socket named by `$NOTIFY_SOCKET` once it serves, so units ordered after
//! it start only then (the manager before `xvtpmd`, `xvtpmd` before `xendomains`).

use std::io;
use std::os::unix::net::UnixDatagram;

/// The variable systemd sets for a `Type=notify` service.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Tells the service manager that we serve, if one asked (`$NOTIFY_SOCKET` set); nothing
/// otherwise. `status` is shown by `systemctl status`.
pub fn ready(status: &str) -> io::Result<()> {
    send(&format!("READY=1\nSTATUS={status}"))
}

/// Sends `message` to `$NOTIFY_SOCKET`, if set: a path, or an abstract name written `@name`.
pub fn send(message: &str) -> io::Result<()> {
    let Some(target) = std::env::var_os(NOTIFY_SOCKET) else { return Ok(()) };
    let target = target.to_string_lossy().into_owned();
    let socket = UnixDatagram::unbound()?;
    match target.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            socket.send_to_addr(message.as_bytes(), &addr)?;
        }
        None => {
            socket.send_to(message.as_bytes(), &target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test for both cases: the variable is process-wide.
    #[test]
    fn ready_reaches_the_socket_systemd_names() {
        std::env::remove_var(NOTIFY_SOCKET);
        ready("not asked").expect("no socket: nothing to do");
        let path = std::env::temp_dir().join(format!("xvtpm-notify-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).expect("bind");
        std::env::set_var(NOTIFY_SOCKET, &path);
        ready("serving 3 vTPMs").expect("send");
        let mut buf = [0u8; 128];
        let n = listener.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving 3 vTPMs");
        std::env::set_var(NOTIFY_SOCKET, path.join("missing"));
        assert!(ready("nobody").is_err(), "a socket that is not there is an error to report");
        std::env::remove_var(NOTIFY_SOCKET);
        let _ = std::fs::remove_file(&path);
    }
}
