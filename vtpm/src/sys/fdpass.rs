//! Receiving a file descriptor passed over a Unix socket (SCM_RIGHTS), which swtpm's
//! CMD_SET_DATAFD needs: QEMU and Cloud Hypervisor hand the TPM's data channel over the control
//! socket this way. std has no stable API for ancillary data, hence `recvmsg` here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Reads what is available on `sock` into `buf` and the first descriptor passed with it, if
/// any (further descriptors in the same message are closed).
pub fn recv_with_fd(sock: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // Room for a few descriptors, 8-byte aligned as cmsghdr requires.
    let mut control = [0u64; 8];
    // SAFETY: an all-zero msghdr is a valid empty message header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at `iov` (covering `buf`) and `control`, all live for the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        log::warn!("control message truncated: descriptors were lost");
    }
    let mut fd = None;
    // SAFETY: `msg` was filled by recvmsg; the CMSG_* macros walk its control buffer.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: CMSG_FIRSTHDR/NXTHDR only return headers inside the control buffer.
        let hdr = unsafe { &*cmsg };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is a pure size computation.
            let payload = hdr.cmsg_len as usize - unsafe { libc::CMSG_LEN(0) } as usize;
            // SAFETY: the payload of an SCM_RIGHTS header is an array of descriptors.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for i in 0..payload / std::mem::size_of::<RawFd>() {
                // SAFETY: within the payload; the data may be unaligned, hence read_unaligned.
                let raw = unsafe { std::ptr::read_unaligned(data.add(i)) };
                // SAFETY: the kernel installed this descriptor for us; we own it now.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                if fd.is_none() {
                    fd = Some(owned);
                }
            }
        }
        // SAFETY: advancing within the same control buffer.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok((n as usize, fd))
}

/// Sends `data` and `fd` over `sock` in one message, as QEMU does for CMD_SET_DATAFD.
pub fn send_with_fd(sock: &UnixStream, data: &[u8], fd: RawFd) -> io::Result<usize> {
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut _, iov_len: data.len() };
    let mut control = [0u64; 4];
    // SAFETY: an all-zero msghdr is valid; fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: a size computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as _;
    // SAFETY: the control buffer holds one header with room for one descriptor.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
    }
    // SAFETY: `msg` points at live buffers for the call; sendmsg only reads them.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_passed_socket_works_on_our_side() {
        let (a, b) = UnixStream::pair().expect("pair");
        let (mut data_ours, mut data_theirs) = UnixStream::pair().expect("data pair");
        assert_eq!(send_with_fd(&a, &[0, 0, 0, 16], data_ours.as_raw_fd()).expect("send"), 4);
        let mut buf = [0u8; 64];
        let (n, fd) = recv_with_fd(&b, &mut buf).expect("recv");
        assert_eq!(&buf[..n], &[0, 0, 0, 16]);
        let mut received = UnixStream::from(fd.expect("a descriptor came"));
        received.write_all(b"through the passed fd").expect("write");
        let mut got = [0u8; 21];
        data_theirs.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"through the passed fd");
        data_ours.write_all(b"x").expect("original still open");
        // A plain message carries no descriptor.
        (&a).write_all(&[1, 2]).expect("write");
        let (n, fd) = recv_with_fd(&b, &mut buf).expect("recv");
        assert_eq!((n, fd.is_none()), (2, true));
    }
}
