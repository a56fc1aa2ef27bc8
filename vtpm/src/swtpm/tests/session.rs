//! One client's session as swtpm serves it: commands, state blobs, startup flags, localities,
//! TPM 1.2.

use super::*;

#[test]
fn tcp_session_follows_swtpm() {
    let mut h = Harness::start(tcp_config(), V2);
    let mut c = h.ctrl();
    // INIT, SHUTDOWN, GET_TPMESTABLISHED, SET_LOCALITY, HASHING, CANCEL, STORE_VOLATILE,
    // RESET_TPMESTABLISHED, GET/SET_STATEBLOB, STOP, GET_CONFIG, SET_BUFFERSIZE and, for TPM 2,
    // SEND_COMMAND_HEADER: 0xafff. No SET_DATAFD (no descriptor passing), no GET_INFO.
    assert_eq!(ctrl_cmd(&mut c, CtrlCmd::GetCapability, &[], 8), [0, 0, 0, 0, 0, 0, 0xaf, 0xff]);

    let mut d = h.data();
    let getrandom = command(0x17b, &[0, 8]);
    assert_eq!(tpm(&mut d, &getrandom), FATAL_V2, "before CMD_INIT the TPM is off");
    assert_eq!(ctrl_cmd(&mut c, CtrlCmd::Init, &[0, 0, 0, 0], 4), [0, 0, 0, 0]);
    let st = h.st();
    assert_eq!((st.inits, st.last_delete_volatile), (1, Some(false)));
    drop(st);
    assert_eq!(tpm(&mut d, &getrandom), echo(V2, 0, &getrandom));

    // SET_LOCALITY as QEMU sends it (sizeof(ptm_loc) = 4 bytes of body).
    assert_eq!(ctrl_cmd(&mut c, CtrlCmd::SetLocality, &[3, 0, 0, 0], 4), [0, 0, 0, 0]);
    assert_eq!(tpm(&mut d, &getrandom), echo(V2, 3, &getrandom));
    assert_eq!(h.st().commands.last().map(|c| c.0), Some(3), "the engine saw locality 3");
    assert_eq!(ctrl_cmd(&mut c, CtrlCmd::SetLocality, &[5], 4), [0, 0, 0, 0x3d]);
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::SetLocality, &[4]), 0, "4 is fine without reject-locality-4");
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::SetLocality, &[0]), 0);

    assert_eq!(ctrl_cmd(&mut c, CtrlCmd::GetTpmEstablished, &[], 8), [0, 0, 0, 0, 1, 0, 0, 0]);
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::ResetTpmEstablished, &[0, 0, 0, 0]), rc::TPM_BAD_LOCALITY, "engine refuses");
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::ResetTpmEstablished, &[7]), rc::TPM_BAD_LOCALITY);
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::ResetTpmEstablished, &[3, 0, 0, 0]), 0);
    assert_eq!(ctrl_cmd(&mut c, CtrlCmd::GetTpmEstablished, &[], 8), [0, 0, 0, 0, 0, 0, 0, 0]);

    // HASH_DATA longer than one read: the rest arrives later.
    let hashdata: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::HashStart, &[]), 0);
    let mut msg = ctrl::encode_request(CtrlCmd::HashData.code(), &(hashdata.len() as u32).to_be_bytes());
    msg.extend_from_slice(&hashdata[..1000]);
    c.write_all(&msg).expect("send");
    std::thread::sleep(Duration::from_millis(50));
    c.write_all(&hashdata[1000..]).expect("send");
    assert_eq!(read_n(&mut c, 4), [0, 0, 0, 0]);
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::HashEnd, &[]), 0);
    let st = h.st();
    assert_eq!((&st.hashing, st.hash_ends), (&hashdata, 1));
    drop(st);

    assert_eq!(ctrl_rc(&mut c, CtrlCmd::StoreVolatile, &[]), 0);
    assert_eq!(h.st().store_volatiles, 1);
    assert_eq!(ctrl_cmd(&mut c, CtrlCmd::GetConfig, &[], 8), [0; 8]);
    assert_eq!(
        ctrl_cmd(&mut c, CtrlCmd::SetBufferSize, &[0, 0, 0, 0], 16),
        [0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 64, 0, 0, 0x20, 0]
    );
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::SetBufferSize, &2048u32.to_be_bytes()), rc::TPM_BAD_ORDINAL, "while running");
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::CancelTpmCmd, &[]), 0, "nothing to cancel is fine");
    assert_eq!(
        ctrl_rc(&mut c, CtrlCmd::GetInfo, &ctrl::GetInfoRequest { flags: 1, offset: 0 }.encode()),
        rc::TPM_BAD_ORDINAL
    );
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::SetDatafd, &[]), rc::TPM_FAIL, "no descriptor passing");
    c.write_all(&0x55u32.to_be_bytes()).expect("send");
    assert_eq!(read_n(&mut c, 4), [0, 0, 0, 0x0a], "unknown command");

    // CANCEL_TPM_CMD while a data command runs (and holds the engine).
    let slow = command(SLOW, &[]);
    let mut d2 = h.data();
    drop(d); // one data client at a time
    let started = Instant::now();
    let worker = std::thread::spawn(move || tpm(&mut d2, &slow));
    h.wait_for("the slow command", |s| s.slow_started);
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::CancelTpmCmd, &[]), 0);
    let r = worker.join().expect("data thread");
    assert_eq!(r, response(V2, TPM_RC_CANCELED, &[]), "the command was cancelled");
    assert!(started.elapsed() < Duration::from_secs(5), "cancel did not wait for the command");

    let mut d = h.data();
    assert_eq!(tpm(&mut d, &command(FAIL, &[])), FATAL_V2, "an engine error is a TPM failure");
    assert_eq!(tpm(&mut d, &getrandom), echo(V2, 0, &getrandom), "and the connection goes on");

    // STOP: off but serving; data commands fail; commands needing a running TPM are refused.
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::Stop, &[]), 0);
    assert!(!h.st().running);
    assert_eq!(tpm(&mut d, &getrandom), FATAL_V2);
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::CancelTpmCmd, &[]), rc::TPM_BAD_ORDINAL);
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::GetTpmEstablished, &[]), rc::TPM_BAD_ORDINAL);
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::HashStart, &[]), rc::TPM_BAD_ORDINAL);
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::StoreVolatile, &[]), rc::TPM_BAD_ORDINAL);
    assert_eq!(
        ctrl_cmd(&mut c, CtrlCmd::SetBufferSize, &2048u32.to_be_bytes(), 16),
        [0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 64, 0, 0, 0x20, 0]
    );
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::Init, &ctrl::InitRequest { init_flags: 1 }.encode()), 0);
    let st = h.st();
    assert_eq!((st.inits, st.last_delete_volatile), (2, Some(true)));
    drop(st);
    // The new buffer size applies to the data channel.
    let big = command(0x17b, &[0; 2100]);
    assert_eq!(tpm(&mut d, &big), SIZE_ERROR_V2);
    expect_eof(&mut d);

    assert_eq!(ctrl_cmd(&mut c, CtrlCmd::Shutdown, &[], 4), [0, 0, 0, 0]);
    h.ended(Duration::from_secs(5)).expect("run() returns Ok after CMD_SHUTDOWN");
    assert!(!h.st().running);
    let ctrl_addr = match &h.ctrl {
        Some(Endpoint::Tcp(a)) => *a,
        other => panic!("{other:?}"),
    };
    assert!(TcpStream::connect(ctrl_addr).is_err(), "the control port is closed");
}

#[test]
fn state_blobs_round_trip_in_parts() {
    let mut cfg = tcp_config();
    cfg.not_need_init = true;
    let h = Harness::start(cfg, V2);
    let mut c = h.ctrl();
    let plain: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 256) as u8).collect();
    let wrapped = blob::wrap(&plain);

    assert_eq!(ctrl_rc(&mut c, CtrlCmd::Stop, &[]), 0);
    assert_eq!(
        ctrl_cmd(
            &mut c,
            CtrlCmd::GetStateBlob,
            &ctrl::GetStateRequest { state_flags: 0, blob_type: 1, offset: 0 }.encode(),
            4
        ),
        [0, 0, 0, 0x0a],
        "GET_STATEBLOB needs a running TPM"
    );
    // SET_STATEBLOB in three writes with pauses between them.
    let hdr = ctrl::SetStateRequest {
        state_flags: 0,
        blob_type: ctrl::PTM_BLOB_TYPE_PERMANENT,
        length: wrapped.len() as u32,
    };
    let mut msg = ctrl::encode_request(CtrlCmd::SetStateBlob.code(), &hdr.encode());
    msg.extend_from_slice(&wrapped[..3000]);
    c.write_all(&msg).expect("send");
    for part in [&wrapped[3000..7000], &wrapped[7000..]] {
        std::thread::sleep(Duration::from_millis(50));
        c.write_all(part).expect("send");
    }
    assert_eq!(read_n(&mut c, 4), [0, 0, 0, 0]);
    assert_eq!(h.st().blobs.get(&StateKind::Permanent), Some(&plain));

    let set = |c: &mut Client, flags: u32, ty: u32, data: &[u8]| {
        let hdr = ctrl::SetStateRequest { state_flags: flags, blob_type: ty, length: data.len() as u32 };
        let mut body = hdr.encode().to_vec();
        body.extend_from_slice(data);
        ctrl_rc(c, CtrlCmd::SetStateBlob, &body)
    };
    assert_eq!(set(&mut c, 0, 1, &plain[..100]), rc::TPM_BAD_PARAMETER, "a raw blob lacks swtpm's container");
    assert_eq!(set(&mut c, ctrl::PTM_STATE_FLAG_ENCRYPTED, 1, &blob::wrap(b"x")), rc::TPM_KEYNOTFOUND);
    assert_eq!(set(&mut c, 0, 9, &blob::wrap(b"x")), rc::TPM_BAD_PARAMETER, "unknown blob type");
    assert_eq!(set(&mut c, 0, ctrl::PTM_BLOB_TYPE_VOLATILE, &blob::wrap(b"volatile")), 0);
    assert_eq!(h.st().blobs.get(&StateKind::Volatile).map(Vec::as_slice), Some(&b"volatile"[..]));

    assert_eq!(ctrl_rc(&mut c, CtrlCmd::Init, &[0, 0, 0, 0]), 0);
    // Refused while running, yet the blob's bytes are consumed: the connection stays usable.
    let mut body =
        ctrl::SetStateRequest { state_flags: 0, blob_type: 1, length: wrapped.len() as u32 }.encode().to_vec();
    body.extend_from_slice(&wrapped);
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::SetStateBlob, &body), rc::TPM_BAD_ORDINAL);
    assert_eq!(ctrl_cmd(&mut c, CtrlCmd::GetConfig, &[], 8), [0; 8]);

    let get = |c: &mut Client, ty: u32, offset: u32| {
        let req = ctrl::GetStateRequest { state_flags: ctrl::PTM_STATE_FLAG_DECRYPTED, blob_type: ty, offset };
        let hdr = ctrl_cmd(c, CtrlCmd::GetStateBlob, &req.encode(), 16);
        let h = ctrl::GetStateResponse::decode(&hdr).expect("header");
        let data = read_n(c, h.length as usize);
        (h, data)
    };
    let (resp, data) = get(&mut c, 1, 0);
    assert_eq!(
        resp,
        ctrl::GetStateResponse {
            tpm_result: 0,
            state_flags: 0,
            totlength: wrapped.len() as u32,
            length: wrapped.len() as u32
        }
    );
    assert_eq!(data, wrapped, "swtpm's container, byte for byte");
    // Reading it in parts, as a client with a small buffer would.
    let (resp, tail) = get(&mut c, 1, 4000);
    assert_eq!((resp.totlength as usize, tail.as_slice()), (wrapped.len() - 4000, &wrapped[4000..]));
    let (resp, none) = get(&mut c, 1, 1 << 20);
    assert_eq!((resp.tpm_result, resp.totlength, none.len()), (0, 0, 0));
    let (resp, _) = get(&mut c, 7, 0);
    assert_eq!(
        resp,
        ctrl::GetStateResponse { tpm_result: rc::TPM_BAD_PARAMETER, state_flags: 0, totlength: 0, length: 0 }
    );
    let (resp, _) = get(&mut c, ctrl::PTM_BLOB_TYPE_SAVESTATE, 0);
    assert_eq!(resp.tpm_result, rc::TPM_FAIL, "the engine's error code");
    let (_, vol) = get(&mut c, ctrl::PTM_BLOB_TYPE_VOLATILE, 0);
    assert_eq!(blob::unwrap(&vol, false), Ok(b"volatile".to_vec()));
    h.st().blobs.insert(StateKind::SaveState, Vec::new());
    let (resp, _) = get(&mut c, ctrl::PTM_BLOB_TYPE_SAVESTATE, 0);
    assert_eq!(
        resp,
        ctrl::GetStateResponse { tpm_result: rc::TPM_RETRY, state_flags: 0, totlength: 0, length: 0 },
        "an empty blob is answered as a missing one, like swtpm"
    );
    assert_eq!(ctrl_cmd(&mut c, CtrlCmd::GetConfig, &[], 8), [0; 8], "still in sync");
}

#[test]
fn startup_flags_power_on_and_start_the_tpm() {
    let mut cfg = tcp_config();
    cfg.startup = Some(StartupType::Clear);
    let h = Harness::start(cfg, V2);
    h.wait_for("startup", |s| !s.commands.is_empty());
    assert_eq!(h.st().inits, 1);
    assert_eq!(h.st().commands[0], (0, vec![0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x44, 0, 0]));
    let mut d = h.data();
    let cmd = command(0x17b, &[0, 8]);
    assert_eq!(tpm(&mut d, &cmd), echo(V2, 0, &cmd), "no CMD_INIT needed");

    let mut cfg = tcp_config();
    cfg.not_need_init = true;
    let h = Harness::start(cfg, V2);
    let mut d = h.data();
    assert_eq!(tpm(&mut d, &cmd), echo(V2, 0, &cmd));
    let st = h.st();
    assert_eq!((st.inits, st.commands.len()), (1, 1), "powered on, no startup sent");
    drop(st);

    let mut cfg = tcp_config();
    cfg.startup = Some(StartupType::Clear);
    let h = Harness::start(cfg, TpmVersion::V1_2);
    h.wait_for("startup", |s| !s.commands.is_empty());
    assert_eq!(h.st().commands[0].1, [0, 0xc1, 0, 0, 0, 0x0c, 0, 0, 0, 0x99, 0, 1]);

    assert_eq!(startup_command(V2, StartupType::State).expect("cmd")[10..], [0, 1]);
    assert_eq!(startup_command(TpmVersion::V1_2, StartupType::State).expect("cmd")[10..], [0, 2]);
    assert_eq!(startup_command(TpmVersion::V1_2, StartupType::Deactivated).expect("cmd")[10..], [0, 3]);
    assert!(startup_command(V2, StartupType::Deactivated).is_err());
    let mut cfg = tcp_config();
    cfg.startup = Some(StartupType::Deactivated);
    let st = Arc::new(Mutex::new(FakeState::default()));
    let fake = Fake { version: V2, st, cancelled: Arc::new((Mutex::new(false), Condvar::new())) };
    assert!(SwtpmServer::new(cfg, Box::new(fake)).is_err(), "TPM 2 has no startup-deactivated");
}

#[test]
fn inband_set_locality_and_tcg_prefix() {
    let mut cfg = tcp_config();
    cfg.not_need_init = true;
    let h = Harness::start(cfg, V2);
    let mut d = h.data();
    let setloc = |l: u8| command(TPM_CC_SET_LOCALITY, &[l]);
    assert_eq!(tpm(&mut d, &setloc(3)), FATAL_V2, "refused without allow-set-locality");
    let cmd = command(0x17b, &[0, 8]);
    assert_eq!(tpm(&mut d, &cmd), echo(V2, 0, &cmd));
    drop(d);

    let mut cfg = tcp_config();
    cfg.not_need_init = true;
    cfg.locality = LocalityOptions { allow_set_locality: true, reject_locality_4: true };
    let h = Harness::start(cfg, V2);
    let mut d = h.data();
    assert_eq!(tpm(&mut d, &setloc(3)), [0x80, 0x01, 0, 0, 0, 0x0a, 0, 0, 0, 0]);
    assert_eq!(tpm(&mut d, &cmd), echo(V2, 3, &cmd));
    assert_eq!(tpm(&mut d, &setloc(4)), [0x80, 0x01, 0, 0, 0, 0x0a, 0, 0, 0x09, 0x07], "reject-locality-4");
    assert_eq!(tpm(&mut d, &command(TPM_CC_SET_LOCALITY, &[])), [0x80, 0x01, 0, 0, 0, 0x0a, 0, 0, 0, 0x9a]);
    let mut c = h.ctrl();
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::SetLocality, &[4]), rc::TPM_BAD_LOCALITY);
    let reached = h.st().commands.iter().filter(|(_, c)| c[6..10] == TPM_CC_SET_LOCALITY.to_be_bytes()).count();
    assert_eq!(reached, 0, "set-locality never reaches the engine");

    // The TCG prefix: locality and length before the command; the answer framed by its
    // length and a zero acknowledgement.
    let mut prefixed = TPM2_SEND_COMMAND.to_be_bytes().to_vec();
    prefixed.push(2);
    prefixed.extend_from_slice(&(cmd.len() as u32).to_be_bytes());
    prefixed.extend_from_slice(&cmd);
    d.write_all(&prefixed).expect("send");
    let want = echo(V2, 2, &cmd);
    let got = read_n(&mut d, 4 + want.len() + 4);
    assert_eq!(got[..4], (want.len() as u32).to_be_bytes());
    assert_eq!(got[4..4 + want.len()], want[..]);
    assert_eq!(got[4 + want.len()..], [0, 0, 0, 0]);
    assert_eq!(tpm(&mut d, &cmd), echo(V2, 2, &cmd), "the prefix's locality stays");
    prefixed[4] = 4;
    d.write_all(&prefixed).expect("send");
    let got = read_n(&mut d, 18);
    assert_eq!(got[4..14], [0x80, 0x01, 0, 0, 0, 0x0a, 0, 0, 0x09, 0x07], "prefix locality 4 refused too");
}

#[test]
fn tpm12_caps_and_error_responses() {
    let h = Harness::start(tcp_config(), TpmVersion::V1_2);
    let mut c = h.ctrl();
    assert_eq!(ctrl_cmd(&mut c, CtrlCmd::GetCapability, &[], 8), [0, 0, 0, 0, 0, 0, 0x2f, 0xff]);
    let mut d = h.data();
    let cmd = command(0x46, &[]);
    assert_eq!(tpm(&mut d, &cmd), [0, 0xc4, 0, 0, 0, 0x0a, 0, 0, 0, 0x09], "TPM_FAIL while off");
    assert_eq!(ctrl_rc(&mut c, CtrlCmd::Init, &[0, 0, 0, 0]), 0);
    assert_eq!(tpm(&mut d, &command(TPM_CC_SET_LOCALITY, &[1])), [0, 0xc4, 0, 0, 0, 0x0a, 0, 0, 0, 0x09]);
    let mut big = command(0x46, &[0; 5000]);
    big[0..2].copy_from_slice(&0x00c1u16.to_be_bytes());
    d.write_all(&big).expect("send");
    assert_eq!(read_n(&mut d, 10), [0, 0xc4, 0, 0, 0, 0x0a, 0, 0, 0, 0x19], "TPM_BAD_PARAM_SIZE");
}
