//! Unix sockets, the data channel handed over with CMD_SET_DATAFD, and the options that end
//! the server.

use super::*;

#[test]
fn unix_sockets_and_datafd() {
    let dir = temp_dir("unix");
    let (dpath, cpath) = (dir.join("data.sock"), dir.join("ctrl.sock"));
    // A stale socket from an earlier run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&cpath).expect("stale socket"));
    // The test's stand-in for recvmsg: a plain read, with a descriptor handed over by the test
    // whenever the message is CMD_SET_DATAFD.
    let pending: Arc<Mutex<Option<OwnedFd>>> = Arc::new(Mutex::new(None));
    let p = pending.clone();
    let receiver: FdReceiver = Arc::new(move |u: &UnixStream, buf: &mut [u8]| {
        let n = (&*u).read(buf)?;
        let fd = if buf[..n].starts_with(&CtrlCmd::SetDatafd.code().to_be_bytes()) {
            p.lock().expect("pending").take()
        } else {
            None
        };
        Ok((n, fd))
    });
    let cfg = quick(ServerConfig {
        data: Some(Endpoint::Unix { path: dpath.clone(), mode: Some(0o600), uid: None, gid: None }),
        ctrl: Some(Endpoint::unix(&cpath)),
        fd_receiver: Some(receiver),
        ..ServerConfig::default()
    });
    let mut h = Harness::start(cfg, V2);
    assert_eq!(std::fs::metadata(&dpath).expect("socket").permissions().mode() & 0o777, 0o600);
    let mut c = h.ctrl();
    assert_eq!(ctrl_cmd(&mut c, CtrlCmd::GetCapability, &[], 8), [0, 0, 0, 0, 0, 0, 0xbf, 0xff], "with SET_DATAFD");
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::Init, &[0, 0, 0, 0]), 0);
    let cmd = command(0x17b, &[0, 8]);
    let mut d = h.data();
    assert_eq!(tpm(&mut d, &cmd), echo(V2, 0, &cmd));
    drop(d);

    // QEMU's way: a socketpair, one end passed over the control channel. Until the server
    // noticed that `d` left, it answers TPM_IOERROR (a data connection is active).
    let deadline = Instant::now() + Duration::from_secs(5);
    let ours = loop {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        *pending.lock().expect("pending") = Some(OwnedFd::from(theirs));
        match ctrl_rc(&mut c, CtrlCmd::SetDatafd, &[]) {
            rc::TPM_IOERROR if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            code => {
                assert_eq!(code, 0, "SET_DATAFD");
                break ours;
            }
        }
    };
    ours.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut ours: Client = Box::new(ours);
    assert_eq!(tpm(&mut ours, &cmd), echo(V2, 0, &cmd));
    assert_eq!(tpm(&mut ours, &cmd), echo(V2, 0, &cmd), "the datafd connection is kept");
    let (_x, y) = UnixStream::pair().expect("pair");
    *pending.lock().expect("pending") = Some(OwnedFd::from(y));
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::SetDatafd, &[]), rc::TPM_IOERROR, "a data connection is active");
    drop(ours);
    *pending.lock().expect("pending") = None;
    // Once the server noticed the close, a new SET_DATAFD is considered (and lacks its fd).
    let deadline = Instant::now() + Duration::from_secs(5);
    let code = loop {
        match ctrl_rc(&mut c, CtrlCmd::SetDatafd, &[]) {
            rc::TPM_IOERROR if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            code => break code,
        }
    };
    assert_eq!(code, rc::TPM_BAD_PARAMETER, "no descriptor came");

    assert_eq!(ctrl_rc(&mut c, CtrlCmd::Shutdown, &[]), 0);
    h.ended(Duration::from_secs(5)).expect("ends");
    assert!(!dpath.exists() && !cpath.exists(), "socket files are removed");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn terminate_and_disconnect_options() {
    // --terminate: losing the data connection ends the server.
    let mut cfg = tcp_config();
    cfg.not_need_init = true;
    cfg.terminate_on_data_disconnect = true;
    let mut h = Harness::start(cfg, V2);
    let mut d = h.data();
    let cmd = command(0x17b, &[0, 8]);
    assert_eq!(tpm(&mut d, &cmd), echo(V2, 0, &cmd));
    drop(d);
    h.ended(Duration::from_secs(5)).expect("ends");
    assert_eq!(h.st().shutdowns, 1, "powered off");

    // --ctrl ...,terminate.
    let mut cfg = tcp_config();
    cfg.terminate_on_ctrl_disconnect = true;
    let mut h = Harness::start(cfg, V2);
    let mut c = h.ctrl();
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::Init, &[0, 0, 0, 0]), 0);
    drop(c);
    h.ended(Duration::from_secs(5)).expect("ends");

    // disconnect: one response per connection.
    let mut cfg = tcp_config();
    cfg.not_need_init = true;
    cfg.disconnect = true;
    let h = Harness::start(cfg, V2);
    for _ in 0..2 {
        let mut d = h.data();
        assert_eq!(tpm(&mut d, &cmd), echo(V2, 0, &cmd));
        expect_eof(&mut d);
    }

    // A Stopper ends run() from outside, also while clients are connected.
    let mut h = Harness::start(tcp_config(), V2);
    let _c = h.ctrl();
    let _d = h.data();
    std::thread::sleep(Duration::from_millis(50));
    h.stopper.stop();
    h.ended(Duration::from_secs(5)).expect("ends");
}
