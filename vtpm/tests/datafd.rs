//! The way QEMU's `-tpmdev emulator` talks to swtpm: only a Unix control socket; the data
//! channel is a socket pair whose one end is passed with CMD_SET_DATAFD.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use xvtpm_tests::tpm2;

fn ctrl(sock: &mut UnixStream, cmd: u32, body: &[u8], reply_len: usize) -> Vec<u8> {
    sock.write_all(&[&cmd.to_be_bytes()[..], body].concat()).expect("ctrl write");
    let mut r = vec![0u8; reply_len];
    sock.read_exact(&mut r).expect("ctrl reply");
    r
}

fn transmit(data: &mut UnixStream, cmd: &[u8]) -> Vec<u8> {
    data.write_all(cmd).expect("data write");
    let mut hdr = [0u8; 10];
    data.read_exact(&mut hdr).expect("header");
    let size = u32::from_be_bytes([hdr[2], hdr[3], hdr[4], hdr[5]]) as usize;
    let mut rsp = hdr.to_vec();
    rsp.resize(size, 0);
    data.read_exact(&mut rsp[10..]).expect("body");
    rsp
}

#[test]
fn qemu_style_set_datafd_init_and_commands() {
    let dir = std::env::temp_dir().join(format!("xvtpm-datafd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let (state, key) = (dir.join("state"), dir.join("key"));
    std::fs::write(&key, [5u8; 32]).expect("key");
    common::create(&state, &key);
    let ctrl_path = dir.join("ctrl.sock");
    let mut child = Command::new(common::VTPM)
        .args(["socket", "--tpm2", "--ctrl"])
        .arg(format!("type=unixio,path={}", ctrl_path.display()))
        .arg("--tpmstate")
        .arg(format!("dir={}", state.display()))
        .arg("--key")
        .arg(format!("file={},mode=aes-256-cbc,format=binary", key.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("vtpm socket");
    let end = Instant::now() + Duration::from_secs(20);
    let mut sock = loop {
        match UnixStream::connect(&ctrl_path) {
            Ok(s) => break s,
            Err(e) if Instant::now() > end => panic!("no control socket: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    // GET_CAPABILITY advertises SET_DATAFD (bit 12 of the capability word, as tpm_ioctl.h says).
    let caps = ctrl(&mut sock, 1, &[], 8);
    let caps = u64::from_be_bytes(caps[..8].try_into().expect("8"));
    assert_ne!(caps & (1 << 12), 0, "PTM_CAP_SET_DATAFD in {caps:#x}");
    let (mut ours, theirs) = UnixStream::pair().expect("pair");
    xvtpm_vtpm::sys::fdpass::send_with_fd(&sock, &16u32.to_be_bytes(), theirs.as_raw_fd()).expect("SET_DATAFD");
    let mut r = [0u8; 4];
    sock.read_exact(&mut r).expect("SET_DATAFD reply");
    assert_eq!(u32::from_be_bytes(r), 0, "SET_DATAFD accepted");
    drop(theirs);
    assert_eq!(u32::from_be_bytes(ctrl(&mut sock, 2, &0u32.to_be_bytes(), 4)[..4].try_into().expect("4")), 0, "INIT");
    assert_eq!(tpm2::rc(&transmit(&mut ours, &tpm2::startup_clear())), 0);
    let r = transmit(&mut ours, &tpm2::get_random(16));
    assert_eq!((tpm2::rc(&r), r.len()), (0, 28));
    // SHUTDOWN ends the process, as with swtpm.
    assert_eq!(ctrl(&mut sock, 3, &[], 4), [0, 0, 0, 0]);
    let end = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < end, "vtpm did not exit after CMD_SHUTDOWN");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
