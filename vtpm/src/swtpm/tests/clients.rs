//! Clients that misbehave, and several at once: each is logged and cut off alone, the next
//! is served.

use super::*;

#[test]
fn bad_clients_are_logged_and_the_next_is_served() {
    let mut cfg = tcp_config();
    cfg.not_need_init = true;
    let h = Harness::start(cfg, V2);
    let getrandom = command(0x17b, &[0, 8]);

    // Control channel garbage.
    let mut c = h.ctrl();
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::Init, &[0; 8]), rc::TPM_BAD_PARAMETER, "INIT wants exactly 4 bytes");
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::Stop, &[1]), rc::TPM_BAD_PARAMETER);
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::Shutdown, &[1]), rc::TPM_BAD_PARAMETER, "and does not end the server");
    c.write_all(b"\xde\xad\xbe\xef garbage").expect("send");
    assert_eq!(read_n(&mut c, 4), [0, 0, 0, 0x0a]);
    c.write_all(&[0, 0]).expect("send");
    expect_eof(&mut c); // an incomplete message is dropped after ctrl_timeout
    let mut c = h.ctrl();
    c.write_all(&CtrlCmd::ResetTpmEstablished.code().to_be_bytes()).expect("send");
    expect_eof(&mut c);
    let mut c = h.ctrl();
    assert_eq!(ctrl_cmd(&mut c, CtrlCmd::GetCapability, &[], 8).len(), 8, "a new control client is served");

    // Data channel: each kind of lie gets the size error and a closed connection.
    let oversize = command(0x17b, &vec![0u8; 5000]);
    let lies_high = {
        let mut v = command(0x17b, &[0, 8]);
        v[2..6].copy_from_slice(&100u32.to_be_bytes());
        v
    };
    let lies_low = {
        let mut v = command(0x17b, &[0, 8, 1, 2]);
        v[2..6].copy_from_slice(&10u32.to_be_bytes());
        v
    };
    let too_small = {
        let mut v = command(0x17b, &[]);
        v[2..6].copy_from_slice(&6u32.to_be_bytes());
        v
    };
    for (what, bytes) in [
        ("larger than the buffer", oversize),
        ("size lies high", lies_high),
        ("size lies low", lies_low),
        ("size below a header", too_small),
        ("garbage", b"hello world garbage".to_vec()),
    ] {
        let mut d = h.data();
        d.write_all(&bytes).expect("send");
        assert_eq!(read_n(&mut d, 10), SIZE_ERROR_V2, "{what}");
        expect_eof(&mut d);
        let mut d = h.data();
        assert_eq!(tpm(&mut d, &getrandom), echo(V2, 0, &getrandom), "served after {what}");
    }
    // Disconnects in the middle of a header and of a body.
    for cut in [4, 12] {
        let mut d = h.data();
        d.write_all(&command(0x17b, &[0; 10])[..cut]).expect("send");
        drop(d);
        let mut d = h.data();
        assert_eq!(tpm(&mut d, &getrandom), echo(V2, 0, &getrandom), "served after a cut at {cut}");
    }
    // An incomplete header times out.
    let mut d = h.data();
    d.write_all(&getrandom[..5]).expect("send");
    expect_eof(&mut d);

    // One data client at a time: the second waits for the first to leave.
    let mut d1 = h.data();
    assert_eq!(tpm(&mut d1, &getrandom), echo(V2, 0, &getrandom));
    let TcpAddr(addr) = tcp_addr(h.data.as_ref());
    let mut d2 = TcpStream::connect(addr).expect("connect");
    d2.write_all(&getrandom).expect("send");
    d2.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
    let mut b = [0u8; 1];
    assert!(d2.read(&mut b).is_err(), "the second client is not served yet");
    drop(d1);
    d2.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut d2: Client = Box::new(d2);
    assert_eq!(read_tpm(&mut d2), echo(V2, 0, &getrandom));

    let processed = h.st().commands.len();
    assert_eq!(processed, 5 + 2 + 1 + 1, "only well-formed commands reached the engine");
    assert!(h.st().running, "the engine is intact");
}

/// The server's one loop (listeners and the control connections in one `poll`): with a
/// control client connected and idle, as QEMU keeps it, data clients still get in; the ones
/// that come while a client is served wait their turn and are served in order; a second
/// control client is served at once beside the idle first (swtpm makes it wait for the first
/// to leave, so one idle client blocked the control channel), and the first stays served.
#[test]
fn control_and_waiting_data_clients_are_served_by_one_loop() {
    let mut cfg = tcp_config();
    cfg.not_need_init = true;
    let h = Harness::start(cfg, V2);
    let getrandom = command(0x17b, &[0, 8]);
    let mut c1 = h.ctrl();
    let mut d1 = h.data();
    assert_eq!(tpm(&mut d1, &getrandom), echo(V2, 0, &getrandom));
    // One waits for the data thread, the other in the listen queue.
    let waiting: Vec<Client> = (0..2)
        .map(|_| {
            let mut d = h.data();
            d.write_all(&getrandom).expect("send");
            d
        })
        .collect();
    assert_eq!(ctrl_cmd(&mut c1, CtrlCmd::GetCapability, &[], 8).len(), 8, "control answers meanwhile");
    let TcpAddr(ctrl_addr) = tcp_addr(h.ctrl.as_ref());
    let mut c2 = TcpStream::connect(ctrl_addr).expect("connect");
    c2.write_all(&ctrl::encode_request(CtrlCmd::GetCapability.code(), &[])).expect("send");
    c2.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut b = [0u8; 8];
    c2.read_exact(&mut b).expect("the second control client is answered while the first idles");
    assert_eq!(ctrl_cmd(&mut c1, CtrlCmd::GetCapability, &[], 8).len(), 8, "the first is still served");
    drop(c1);
    assert_eq!(tpm(&mut d1, &getrandom), echo(V2, 0, &getrandom), "the first data client is still served");
    drop(d1);
    for mut d in waiting {
        assert_eq!(read_tpm(&mut d), echo(V2, 0, &getrandom), "served in turn");
    }
    assert_eq!(h.st().commands.len(), 4);
}

/// A control client that trickles a long transfer (CMD_HASH_DATA declaring 100,000 bytes:
/// the first message at once, then one byte every 150 ms) is cut off after the transfer's
/// deadline (the data timeout per 64 KiB), so it cannot keep the server's loop from
/// accepting data clients for long.
#[test]
fn a_trickling_control_client_is_cut_off() {
    let h = Harness::start(tcp_config(), V2);
    let mut c = h.ctrl();
    let mut first = 100_000u32.to_be_bytes().to_vec();
    first.resize(ctrl::CTRL_INPUT_SIZE - 4, 0);
    c.write_all(&ctrl::encode_request(CtrlCmd::HashData.code(), &first)).expect("send");
    let started = Instant::now();
    let trickle = std::thread::spawn(move || {
        let mut sent = 0;
        while sent < 30 && c.write_all(&[0]).is_ok() {
            sent += 1;
            std::thread::sleep(Duration::from_millis(150));
        }
        c
    });
    // Meanwhile a data client gets in, once the transfer is cut off.
    let mut d = h.data();
    let getrandom = command(0x17b, &[0, 8]);
    d.write_all(&getrandom).expect("send");
    assert_eq!(read_tpm(&mut d).len(), 10, "answered (the TPM is off: an error response)");
    assert!(started.elapsed() < Duration::from_secs(3), "the data client waited {:?}", started.elapsed());
    let mut c = trickle.join().expect("trickler");
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    assert!(rest.len() <= 4, "at most a result code, then the connection closes: {rest:02x?}");
}

/// Control clients beyond [`MAX_CTRL_CLIENTS`](crate::swtpm::server) are closed at once; the
/// ones connected keep being served.
#[test]
fn control_clients_beyond_the_cap_are_closed() {
    let h = Harness::start(tcp_config(), V2);
    let mut held: Vec<Client> = (0..8).map(|_| h.ctrl()).collect();
    for c in &mut held {
        assert_eq!(ctrl_cmd(c, CtrlCmd::GetCapability, &[], 8).len(), 8);
    }
    let mut extra = h.ctrl();
    let _ = extra.write_all(&ctrl::encode_request(CtrlCmd::GetCapability.code(), &[]));
    let mut b = [0u8; 8];
    assert!(matches!(extra.read(&mut b), Ok(0) | Err(_)), "a ninth control client was served");
    assert_eq!(ctrl_cmd(&mut held[0], CtrlCmd::GetCapability, &[], 8).len(), 8, "the others still are");
}

/// Serving control clients side by side must not let a second client act on the TPM under
/// the one that drives it (QEMU): the first to act holds the channel until it leaves, and
/// meanwhile another may ask (capabilities, established flag, config, info) but a power, state
/// or locality command gets TPM_FAIL and changes nothing.
#[test]
fn a_second_control_client_may_ask_but_not_act_while_the_first_holds_the_channel() {
    let h = Harness::start(tcp_config(), V2);
    let mut qemu = h.ctrl();
    assert_eq!(ctrl_rc(&mut qemu, CtrlCmd::Init, &[0, 0, 0, 0]), 0, "the first client acts");
    let mut other = h.ctrl();
    assert_eq!(ctrl_cmd(&mut other, CtrlCmd::GetCapability, &[], 8).len(), 8, "asking is fine");
    for cmd in [CtrlCmd::Init, CtrlCmd::Stop, CtrlCmd::SetLocality, CtrlCmd::Shutdown] {
        let body: &[u8] = if cmd == CtrlCmd::SetLocality { &[1] } else { &[0, 0, 0, 0] };
        let body = if matches!(cmd, CtrlCmd::Stop | CtrlCmd::Shutdown) { &[][..] } else { body };
        assert_eq!(ctrl_rc(&mut other, cmd, body), rc::TPM_FAIL, "{} from a second client", cmd.name());
    }
    assert!(h.st().running, "the TPM was not touched");
    let inits = h.st().inits;
    assert_eq!(ctrl_rc(&mut qemu, CtrlCmd::Init, &[0, 0, 0, 0]), 0, "the holder still acts");
    assert_eq!(h.st().inits, inits + 1);
    // The holder leaves: the next client to act holds the channel.
    drop(qemu);
    let end = Instant::now() + Duration::from_secs(5);
    while ctrl_rc(&mut other, CtrlCmd::Init, &[0, 0, 0, 0]) != 0 {
        assert!(Instant::now() < end, "the channel was not released");
        std::thread::sleep(Duration::from_millis(20));
    }
}
