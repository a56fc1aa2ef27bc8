//! Broken and hostile clients of `vtpm socket`: garbage on the data and control channels, a
//! command larger than the buffer, size fields that lie, a client that disconnects mid-command.
//! Each gets an error reply or is dropped with a log line; the next client is served and the
//! TPM's state is intact, also after a restart.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use xvtpm_tests::tpm2::{self, TcpTpm};

const INDEX: u32 = 0x0150_0030;

/// Sends raw bytes on a fresh data connection; returns what came back before the server
/// answered or closed (at most one response).
fn abuse_data(port: u16, bytes: &[u8], half_close: bool) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let _ = s.write_all(bytes);
    if half_close {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.len() >= 10 {
            break;
        }
    }
    out
}

fn healthy(port: u16) {
    let mut t = TcpTpm::connect(port).expect("next client connects");
    let rsp = t.transmit(&tpm2::nv_read(INDEX, 8)).expect("next client served");
    assert_eq!(tpm2::rc(&rsp), 0, "NV_Read rc {:#x}", tpm2::rc(&rsp));
    assert_eq!(tpm2::nv_read_data(&rsp), Some(&b"intact!!"[..]), "state intact");
}

#[test]
fn bad_clients_are_answered_or_dropped_and_the_tpm_stays_intact() {
    let dir = std::env::temp_dir().join(format!("xvtpm-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let (state, key) = (dir.join("state"), dir.join("key"));
    std::fs::write(&key, [1u8; 32]).expect("key");
    common::create(&state, &key);
    let vtpm = common::start(&state, &key, 1);
    {
        let mut t = TcpTpm::connect(vtpm.port).expect("connect");
        assert_eq!(tpm2::rc(&t.transmit(&tpm2::nv_define(INDEX, 8)).expect("define")), 0);
        assert_eq!(tpm2::rc(&t.transmit(&tpm2::nv_write(INDEX, b"intact!!")).expect("write")), 0);
    }

    // Garbage whose "size" field is huge: a size error response, then the connection closes.
    let garbage: Vec<u8> = (0..200u32).map(|i| (i * 37 % 251) as u8).collect();
    let r = abuse_data(vtpm.port, &garbage, false);
    assert!(r.is_empty() || tpm2::rc(&r) != 0, "garbage got a success: {r:02x?}");
    healthy(vtpm.port);

    // A command larger than the buffer (header claims 1 MiB).
    let mut big = vec![0x80, 0x01, 0x00, 0x10, 0x00, 0x00, 0, 0, 0x01, 0x7b];
    big.extend(std::iter::repeat_n(0u8, 8192));
    let r = abuse_data(vtpm.port, &big, false);
    assert!(r.len() >= 10 && tpm2::rc(&r) == 0x142, "oversized command: {r:02x?}");
    healthy(vtpm.port);

    // Size field smaller than the header, and one larger than what is sent.
    let r = abuse_data(vtpm.port, &[0x80, 0x01, 0, 0, 0, 4, 0, 0, 0x01, 0x7b], false);
    assert!(r.is_empty() || tpm2::rc(&r) != 0, "size 4: {r:02x?}");
    healthy(vtpm.port);
    let r = abuse_data(vtpm.port, &[0x80, 0x01, 0, 0, 0, 40, 0, 0, 0x01, 0x7b, 0, 0x10], true);
    assert!(r.is_empty() || tpm2::rc(&r) != 0, "short command: {r:02x?}");
    healthy(vtpm.port);

    // Disconnect in the middle of a command.
    let mut s = TcpStream::connect(("127.0.0.1", vtpm.port)).expect("connect");
    s.write_all(&tpm2::get_random(16)[..5]).expect("partial");
    drop(s);
    healthy(vtpm.port);

    // Garbage on the control channel: dropped; the next control client is served.
    let ctrl = vtpm.port + 1;
    let mut c = TcpStream::connect(("127.0.0.1", ctrl)).expect("ctrl");
    c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    c.write_all(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3]).expect("garbage");
    let mut reply = [0u8; 4];
    let _ = c.read(&mut reply);
    drop(c);
    let mut c = TcpStream::connect(("127.0.0.1", ctrl)).expect("ctrl");
    c.write_all(&1u32.to_be_bytes()).expect("GET_CAPABILITY");
    let mut caps = [0u8; 8];
    c.read_exact(&mut caps).expect("capabilities");
    assert_ne!(u64::from_be_bytes(caps), 0);
    drop(c);
    healthy(vtpm.port);

    let log = vtpm.log();
    for needle in ["dropping the connection", "disconnected in the middle of a command", "unknown command 0xdeadbeef"] {
        assert!(log.contains(needle), "no log line {needle:?}:\n{log}");
    }
    drop(vtpm);
    let vtpm = common::start(&state, &key, 2);
    healthy(vtpm.port);
    drop(vtpm);
    let _ = std::fs::remove_dir_all(&dir);
}
