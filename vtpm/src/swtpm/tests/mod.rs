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

mod clients;
mod session;
mod sockets;

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
    fn resume(&mut self, volatile: &[u8]) -> Result<()> {
        self.st().blobs.insert(StateKind::Volatile, volatile.to_vec());
        self.init(false)
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

struct TcpAddr(SocketAddr);

fn tcp_addr(ep: Option<&Endpoint>) -> TcpAddr {
    match ep {
        Some(Endpoint::Tcp(a)) => TcpAddr(*a),
        other => panic!("not tcp: {other:?}"),
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("xvtpm-swtpm-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}
