//! Sessions against the server with a fake engine: the control protocol as swtpm 0.7.1
//! answers it (expected bytes worked out from tpm_ioctl.h and checked against the real
//! binary), the data channel, and clients that misbehave.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::blob;
use super::ctrl::{self, rc, CtrlCmd};
use super::server::*;
use crate::engine::{Canceller, StateKind, TpmEngine, TpmVersion};
use crate::{Error, Result};

/// Waits until cancelled, then answers TPM_RC_CANCELED.
const SLOW: u32 = 0x2000_0001;
/// Fails inside the engine.
const FAIL: u32 = 0x2000_0002;
const TPM_RC_CANCELED: u32 = 0x909;

#[derive(Debug, Default)]
struct FakeState {
    running: bool,
    inits: usize,
    shutdowns: usize,
    last_delete_volatile: Option<bool>,
    /// (locality, command) of every processed command.
    commands: Vec<(u8, Vec<u8>)>,
    slow_started: bool,
    established: bool,
    hashing: Vec<u8>,
    hash_ends: usize,
    store_volatiles: usize,
    blobs: HashMap<StateKind, Vec<u8>>,
    buffer_size: u32,
}

struct Fake {
    version: TpmVersion,
    st: Arc<Mutex<FakeState>>,
    cancelled: Arc<(Mutex<bool>, Condvar)>,
}

impl Fake {
    fn st(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.st.lock().expect("fake state")
    }
}

fn response(version: TpmVersion, code: u32, payload: &[u8]) -> Vec<u8> {
    let tag: u16 = if version == TpmVersion::V2_0 { 0x8001 } else { 0x00c4 };
    let mut r = tag.to_be_bytes().to_vec();
    r.extend_from_slice(&((10 + payload.len()) as u32).to_be_bytes());
    r.extend_from_slice(&code.to_be_bytes());
    r.extend_from_slice(payload);
    r
}

impl TpmEngine for Fake {
    fn version(&self) -> TpmVersion {
        self.version
    }
    fn init(&mut self, delete_volatile: bool) -> Result<()> {
        let mut st = self.st();
        if st.running {
            return Err(Error::PowerState("running"));
        }
        st.running = true;
        st.inits += 1;
        st.established = true;
        st.last_delete_volatile = Some(delete_volatile);
        if delete_volatile {
            st.blobs.remove(&StateKind::Volatile);
        }
        Ok(())
    }
    fn shutdown(&mut self) {
        let mut st = self.st();
        if st.running {
            st.running = false;
            st.shutdowns += 1;
        }
    }
    fn is_running(&self) -> bool {
        self.st().running
    }
    fn process(&mut self, locality: u8, command: &[u8]) -> Result<Vec<u8>> {
        let ordinal = u32::from_be_bytes(command[6..10].try_into().expect("header"));
        self.st().commands.push((locality, command.to_vec()));
        match ordinal {
            SLOW => {
                let (flag, cv) = &*self.cancelled;
                let mut c = flag.lock().expect("cancel flag");
                *c = false;
                self.st().slow_started = true;
                let (c, _) = cv.wait_timeout_while(c, Duration::from_secs(10), |c| !*c).expect("wait");
                Ok(response(self.version, if *c { TPM_RC_CANCELED } else { 0 }, &[]))
            }
            FAIL => Err(Error::Protocol("fake engine failure".into())),
            _ => {
                let mut payload = vec![locality];
                payload.extend_from_slice(command);
                Ok(response(self.version, 0, &payload))
            }
        }
    }
    fn canceller(&self) -> Canceller {
        let c = self.cancelled.clone();
        Arc::new(move || {
            *c.0.lock().expect("cancel flag") = true;
            c.1.notify_all();
        })
    }
    fn store_volatile(&mut self) -> Result<()> {
        self.st().store_volatiles += 1;
        Ok(())
    }
    fn get_state(&mut self, kind: StateKind) -> Result<Vec<u8>> {
        self.st().blobs.get(&kind).cloned().ok_or(Error::Tpm { op: "get state", rc: rc::TPM_FAIL })
    }
    fn set_state(&mut self, kind: StateKind, data: &[u8]) -> Result<()> {
        let mut st = self.st();
        if st.running {
            return Err(Error::PowerState("running"));
        }
        st.blobs.insert(kind, data.to_vec());
        Ok(())
    }
    fn set_buffer_size(&mut self, wanted: u32) -> Result<(u32, u32, u32)> {
        let mut st = self.st();
        if wanted != 0 {
            if st.running {
                return Err(Error::PowerState("running"));
            }
            st.buffer_size = wanted.clamp(64, 8192);
        }
        Ok((st.buffer_size, 64, 8192))
    }
    fn established(&mut self) -> Result<bool> {
        Ok(self.st().established)
    }
    fn reset_established(&mut self, locality: u8) -> Result<()> {
        if locality < 3 {
            return Err(Error::Tpm { op: "reset established", rc: rc::TPM_BAD_LOCALITY });
        }
        self.st().established = false;
        Ok(())
    }
    fn hash_start(&mut self) -> Result<()> {
        self.st().hashing.clear();
        Ok(())
    }
    fn hash_data(&mut self, data: &[u8]) -> Result<()> {
        self.st().hashing.extend_from_slice(data);
        Ok(())
    }
    fn hash_end(&mut self) -> Result<()> {
        self.st().hash_ends += 1;
        Ok(())
    }
}

trait Rw: Read + Write + Send {}
impl<T: Read + Write + Send> Rw for T {}
type Client = Box<dyn Rw>;

fn connect(ep: &Endpoint) -> Client {
    let timeout = Some(Duration::from_secs(10));
    match ep {
        Endpoint::Tcp(a) => {
            let s = TcpStream::connect(a).expect("connect tcp");
            s.set_read_timeout(timeout).expect("timeout");
            Box::new(s)
        }
        Endpoint::Unix { path, .. } => {
            let s = UnixStream::connect(path).expect("connect unix");
            s.set_read_timeout(timeout).expect("timeout");
            Box::new(s)
        }
    }
}

fn read_n(c: &mut Client, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    c.read_exact(&mut b).expect("read answer");
    b
}

fn ctrl_cmd(c: &mut Client, cmd: CtrlCmd, body: &[u8], resp_len: usize) -> Vec<u8> {
    c.write_all(&ctrl::encode_request(cmd.code(), body)).expect("send ctrl");
    read_n(c, resp_len)
}

fn ctrl_rc(c: &mut Client, cmd: CtrlCmd, body: &[u8]) -> u32 {
    u32::from_be_bytes(ctrl_cmd(c, cmd, body, 4).try_into().expect("4 bytes"))
}

fn read_tpm(c: &mut Client) -> Vec<u8> {
    let mut r = read_n(c, 10);
    let size = u32::from_be_bytes(r[2..6].try_into().expect("size")) as usize;
    r.extend(read_n(c, size - 10));
    r
}

fn tpm(c: &mut Client, cmd: &[u8]) -> Vec<u8> {
    c.write_all(cmd).expect("send command");
    read_tpm(c)
}

fn expect_eof(c: &mut Client) {
    let mut b = [0u8; 16];
    match c.read(&mut b) {
        Ok(0) => {}
        Ok(n) => panic!("expected the server to close, got {:02x?}", &b[..n]),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "expected EOF: {e}"),
    }
}

fn command(ordinal: u32, payload: &[u8]) -> Vec<u8> {
    let mut c = 0x8001u16.to_be_bytes().to_vec();
    c.extend_from_slice(&((10 + payload.len()) as u32).to_be_bytes());
    c.extend_from_slice(&ordinal.to_be_bytes());
    c.extend_from_slice(payload);
    c
}

/// The fake's answer to an echoed command.
fn echo(version: TpmVersion, locality: u8, cmd: &[u8]) -> Vec<u8> {
    let mut p = vec![locality];
    p.extend_from_slice(cmd);
    response(version, 0, &p)
}

fn tcp0() -> Option<Endpoint> {
    Some(Endpoint::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))))
}

fn quick(mut cfg: ServerConfig) -> ServerConfig {
    cfg.data_timeout = Duration::from_millis(300);
    cfg.ctrl_timeout = Duration::from_millis(200);
    cfg
}

fn tcp_config() -> ServerConfig {
    quick(ServerConfig { data: tcp0(), ctrl: tcp0(), ..ServerConfig::default() })
}

struct Harness {
    st: Arc<Mutex<FakeState>>,
    data: Option<Endpoint>,
    ctrl: Option<Endpoint>,
    stopper: Stopper,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Harness {
    fn start(cfg: ServerConfig, version: TpmVersion) -> Self {
        let _ = env_logger::builder().is_test(true).try_init();
        let st = Arc::new(Mutex::new(FakeState { buffer_size: 4096, ..FakeState::default() }));
        let fake = Fake { version, st: st.clone(), cancelled: Arc::new((Mutex::new(false), Condvar::new())) };
        let server = SwtpmServer::new(cfg, Box::new(fake)).expect("server binds");
        let (data, ctrl) = (server.data_endpoint().cloned(), server.ctrl_endpoint().cloned());
        let stopper = server.stopper();
        let thread = Some(std::thread::spawn(move || server.run()));
        Self { st, data, ctrl, stopper, thread }
    }

    fn st(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.st.lock().expect("fake state")
    }

    fn ctrl(&self) -> Client {
        connect(self.ctrl.as_ref().expect("ctrl endpoint"))
    }

    fn data(&self) -> Client {
        connect(self.data.as_ref().expect("data endpoint"))
    }

    /// Waits for `run` to return and gives its result.
    fn ended(&mut self, within: Duration) -> Result<()> {
        let t = self.thread.take().expect("still running");
        let deadline = Instant::now() + within;
        while !t.is_finished() {
            assert!(Instant::now() < deadline, "run() did not return within {within:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
        t.join().expect("run() panicked")
    }

    fn wait_for(&self, what: &str, f: impl Fn(&FakeState) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f(&self.st()) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stopper.stop();
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

const V2: TpmVersion = TpmVersion::V2_0;
const FATAL_V2: [u8; 10] = [0x80, 0x01, 0, 0, 0, 0x0a, 0, 0, 0x01, 0x01];
const SIZE_ERROR_V2: [u8; 10] = [0x80, 0x01, 0, 0, 0, 0x0a, 0, 0, 0x01, 0x42];

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

/// The server's one loop (listeners and the control connection in one `poll`): with a control
/// client connected and idle, as QEMU keeps it, data clients still get in; the ones that come
/// while a client is served wait their turn and are served in order; a second control client
/// waits for the first.
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
    c2.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
    let mut b = [0u8; 8];
    assert!(c2.read(&mut b).is_err(), "the second control client waits for the first");
    drop(c1);
    c2.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    c2.read_exact(&mut b).expect("the second control client is answered once the first left");
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

struct TcpAddr(SocketAddr);

fn tcp_addr(ep: Option<&Endpoint>) -> TcpAddr {
    match ep {
        Some(Endpoint::Tcp(a)) => TcpAddr(*a),
        other => panic!("not tcp: {other:?}"),
    }
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

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("xvtpm-swtpm-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

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
