//! swtpm's socket server over any [`TpmEngine`]: a data channel carrying TPM commands and a
//! control channel carrying the commands of `tpm_ioctl.h`, with swtpm 0.7.1's semantics.
//!
//! Two threads. The data thread serves data connections, one at a time like swtpm: the next
//! client waits until the current one disconnects. The thread that calls [`SwtpmServer::run`]
//! waits in one `poll` on both listeners and the control connection: it accepts data
//! connections for the data thread (one waits at a time, the rest stay in the listen queue)
//! and serves control connections (also one at a time). The engine sits behind a mutex;
//! CANCEL_TPM_CMD uses the engine's canceller so it works while a data command holds it.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use super::blob;
pub use super::conn::Endpoint;
use super::conn::{read_until, Listener, Stream};
use super::ctrl::{self, rc, CtrlCmd};
use crate::engine::{Canceller, StateKind, TpmEngine, TpmVersion};
use crate::{Error, Result};
use xvtpm_proto::tpm;
pub use xvtpm_proto::tpm::StartupType;

/// The vendor ordinal of swtpm's in-band set-locality command (TPM 2 and TPM 1.2 alike).
pub const TPM_CC_SET_LOCALITY: u32 = 0x2000_1000;
/// `TPM2_SEND_COMMAND`: the first word of the TCG command prefix (locality, length) that
/// TPM 2 data-channel commands may carry.
pub const TPM2_SEND_COMMAND: u32 = 8;
/// Size of a TPM command/response header (tag, size, ordinal/code).
pub const TPM_HEADER_SIZE: usize = tpm::HEADER_SIZE;
const TPM2_ST_NO_SESSIONS: u16 = tpm::TPM_ST_NO_SESSIONS;
const TPM2_ST_SESSIONS: u16 = tpm::TPM_ST_SESSIONS;
const TCG_PREFIX_SIZE: usize = 9;
const DEFAULT_BUFFER_SIZE: u32 = 4096;

/// Receives the first read of a control message on a Unix socket together with a file
/// descriptor passed with SCM_RIGHTS (needed for CMD_SET_DATAFD): returns the byte count and
/// the descriptor, if one came. Receiving descriptors needs `recvmsg`, which this module
/// cannot call without `unsafe`; the binary may supply it.
pub type FdReceiver = Arc<dyn Fn(&UnixStream, &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> + Send + Sync>;

/// swtpm's `--locality` options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocalityOptions {
    /// Accept the in-band TPM_CC_SET_LOCALITY command on the data channel.
    pub allow_set_locality: bool,
    /// Refuse to switch to locality 4.
    pub reject_locality_4: bool,
}

/// How the server listens and behaves.
#[derive(Clone)]
pub struct ServerConfig {
    /// The data channel (`--server`); `None` when data arrives only through CMD_SET_DATAFD.
    pub data: Option<Endpoint>,
    /// The control channel (`--ctrl`).
    pub ctrl: Option<Endpoint>,
    /// Power the TPM on at start instead of waiting for CMD_INIT (`--flags not-need-init`).
    pub not_need_init: bool,
    /// Power on at start and send this startup command (`--flags startup-*`).
    pub startup: Option<StartupType>,
    /// `--locality` options.
    pub locality: LocalityOptions,
    /// Close a data connection after each response (`--server ...,disconnect`, `-p`).
    pub disconnect: bool,
    /// End when a data connection is lost (`--terminate`).
    pub terminate_on_data_disconnect: bool,
    /// End when a control connection is lost (`--ctrl ...,terminate`).
    pub terminate_on_ctrl_disconnect: bool,
    /// Report `PTM_CONFIG_FLAG_FILE_KEY` in GET_CONFIG (the state is encrypted at rest).
    pub file_key: bool,
    /// How long the rest of a data-channel command (or of a long control transfer) may take
    /// once its first byte arrived.
    pub data_timeout: Duration,
    /// How long a control message may take to arrive completely (swtpm: 500 ms).
    pub ctrl_timeout: Duration,
    /// The largest state blob SET_STATEBLOB accepts.
    pub max_state_blob: usize,
    /// After answering, how long to keep polling the data socket for the client's next
    /// command before sleeping in `read` (zero: never poll). A client sending commands back to
    /// back then skips our wake-up; an idle one costs this much CPU once.
    pub poll: Duration,
    /// Enables CMD_SET_DATAFD on Unix control sockets; see [`FdReceiver`].
    pub fd_receiver: Option<FdReceiver>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            data: None,
            ctrl: None,
            not_need_init: false,
            startup: None,
            locality: LocalityOptions::default(),
            disconnect: false,
            terminate_on_data_disconnect: false,
            terminate_on_ctrl_disconnect: false,
            file_key: false,
            data_timeout: Duration::from_secs(2),
            ctrl_timeout: Duration::from_millis(500),
            max_state_blob: 16 << 20,
            poll: Duration::from_micros(50),
            fd_receiver: None,
        }
    }
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("data", &self.data)
            .field("ctrl", &self.ctrl)
            .field("not_need_init", &self.not_need_init)
            .field("startup", &self.startup)
            .field("locality", &self.locality)
            .field("disconnect", &self.disconnect)
            .field("terminate_on_data_disconnect", &self.terminate_on_data_disconnect)
            .field("terminate_on_ctrl_disconnect", &self.terminate_on_ctrl_disconnect)
            .field("file_key", &self.file_key)
            .field("data_timeout", &self.data_timeout)
            .field("poll", &self.poll)
            .field("ctrl_timeout", &self.ctrl_timeout)
            .field("max_state_blob", &self.max_state_blob)
            .field("fd_receiver", &self.fd_receiver.as_ref().map(|_| "set"))
            .finish()
    }
}

/// The TPM command swtpm sends for `startup` on a TPM of `version`.
pub fn startup_command(version: TpmVersion, startup: StartupType) -> Result<Vec<u8>> {
    tpm::startup(version.into(), startup)
        .ok_or_else(|| Error::Config("TPM 2 does not support startup-deactivated".into()))
}

pub use crate::engine::error_response;

/// The response swtpm sends to data-channel commands while the TPM is off.
pub fn fatal_error_response(version: TpmVersion) -> Vec<u8> {
    error_response(version, crate::engine::failure_rc(version))
}

fn size_error_code(version: TpmVersion) -> u32 {
    match version {
        TpmVersion::V2_0 => rc::TPM_RC_COMMAND_SIZE,
        TpmVersion::V1_2 => rc::TPM_BAD_PARAM_SIZE,
    }
}

fn locality_error_code(version: TpmVersion) -> u32 {
    match version {
        TpmVersion::V2_0 => rc::TPM_RC_LOCALITY,
        TpmVersion::V1_2 => rc::TPM_BAD_LOCALITY,
    }
}

/// The `ptm_res` for an engine error.
fn result_code(e: &Error) -> u32 {
    match e {
        Error::Tpm { rc, .. } => *rc,
        Error::PowerState(_) => rc::TPM_BAD_ORDINAL,
        _ => rc::TPM_FAIL,
    }
}

fn blob_kind(blob_type: u32) -> Option<StateKind> {
    match blob_type {
        ctrl::PTM_BLOB_TYPE_PERMANENT => Some(StateKind::Permanent),
        ctrl::PTM_BLOB_TYPE_VOLATILE => Some(StateKind::Volatile),
        ctrl::PTM_BLOB_TYPE_SAVESTATE => Some(StateKind::SaveState),
        _ => None,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the server down with it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A data connection waiting to be served.
#[derive(Debug)]
struct DataConn {
    stream: Stream,
    peer: String,
    /// Keep the connection across responses (always for SET_DATAFD connections).
    keep: bool,
}

/// Hands data connections to the data thread, one at a time.
#[derive(Debug, Default)]
struct Handoff {
    /// From CMD_SET_DATAFD; served first.
    datafd: Option<DataConn>,
    /// From the data listener.
    accepted: Option<DataConn>,
    /// A data connection is being served.
    active: bool,
}

/// What the threads and a [`Stopper`] share, apart from the engine.
#[derive(Debug)]
struct Control {
    terminating: AtomicBool,
    handoff: Mutex<Handoff>,
    handoff_cv: Condvar,
    /// Clones of the connections being served, to unblock their threads on termination.
    active_data: Mutex<Option<Stream>>,
    active_ctrl: Mutex<Option<Stream>>,
    /// A byte on `wake_tx` ends the main loop's `poll` so that it looks at the handoff and the
    /// termination flag again; `wake_rx` is the end it polls (non-blocking).
    wake_tx: UnixStream,
    wake_rx: UnixStream,
}

impl Control {
    fn new() -> Result<Self> {
        let (wake_tx, wake_rx) = UnixStream::pair().map_err(|e| Error::io("make the server's wake-up socket", e))?;
        for s in [&wake_tx, &wake_rx] {
            s.set_nonblocking(true).map_err(|e| Error::io("make the server's wake-up socket", e))?;
        }
        Ok(Self {
            terminating: AtomicBool::new(false),
            handoff: Mutex::new(Handoff::default()),
            handoff_cv: Condvar::new(),
            active_data: Mutex::new(None),
            active_ctrl: Mutex::new(None),
            wake_tx,
            wake_rx,
        })
    }

    fn terminating(&self) -> bool {
        self.terminating.load(Ordering::SeqCst)
    }

    fn terminate(&self) {
        self.terminating.store(true, Ordering::SeqCst);
        drop(lock(&self.handoff));
        self.handoff_cv.notify_all();
        for s in [&self.active_data, &self.active_ctrl] {
            if let Some(s) = lock(s).as_ref() {
                s.shutdown(Shutdown::Both);
            }
        }
        self.wake();
    }

    /// Makes the main loop look again. A full socket already holds a wake-up, so a failed
    /// write loses nothing.
    fn wake(&self) {
        let _ = (&self.wake_tx).write(&[1]);
    }

    /// Empties the wake-up socket after the main loop woke.
    fn drain_wakes(&self) {
        let mut buf = [0u8; 64];
        while matches!((&self.wake_rx).read(&mut buf), Ok(n) if n > 0) {}
    }

    /// Remembers a connection being served; false (and nothing remembered) if the server is
    /// already ending.
    fn track(&self, slot: &Mutex<Option<Stream>>, s: &Stream) -> bool {
        *lock(slot) = s.try_clone().ok();
        if self.terminating() {
            *lock(slot) = None;
            return false;
        }
        true
    }
}

/// Ends a running [`SwtpmServer`] from another thread, as CMD_SHUTDOWN does.
#[derive(Debug, Clone)]
pub struct Stopper(Arc<Control>);

impl Stopper {
    /// Makes `run` power the TPM off and return.
    pub fn stop(&self) {
        self.0.terminate();
    }
}

struct Shared {
    engine: Mutex<Box<dyn TpmEngine>>,
    canceller: Canceller,
    version: TpmVersion,
    locality: AtomicU8,
    buffer_size: AtomicU32,
    ctl: Arc<Control>,
    cfg: ServerConfig,
}

/// What the control loop does after a command.
enum CtrlOutcome {
    Reply(Vec<u8>),
    /// Answer, then drop the connection (the stream is out of sync).
    ReplyAndClose(Vec<u8>),
    /// Drop the connection without an answer (it broke).
    Close,
    /// Answer, then end the server (CMD_SHUTDOWN).
    ReplyAndTerminate(Vec<u8>),
}

/// A TPM command read from the data channel.
struct Frame {
    command: Vec<u8>,
    /// The TCG prefix's locality, when the command came with one.
    prefix_locality: Option<u8>,
}

/// Reads the rest of a command that arrived in pieces, all within one deadline set at the
/// first extra read.
struct SlowReader {
    deadline: Option<Instant>,
    timeout: Duration,
}

impl SlowReader {
    /// Reads until `buf[..to]` is filled. `Err(None)` on a timeout (the caller picks the
    /// error), `Err(Some(..))` otherwise.
    fn fill(&mut self, s: &mut Stream, buf: &mut [u8], got: &mut usize, to: usize) -> Result<(), Option<FrameError>> {
        while *got < to {
            let deadline = *self.deadline.get_or_insert_with(|| Instant::now() + self.timeout);
            match read_until(s, &mut buf[*got..to], Some(deadline)) {
                Ok(0) => return Err(Some(FrameError::Disconnected)),
                Ok(n) => *got += n,
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(None),
                Err(e) => return Err(Some(FrameError::Io(e))),
            }
        }
        Ok(())
    }
}

enum FrameError {
    /// The client closed in the middle of a command.
    Disconnected,
    /// The command did not complete in time.
    Timeout,
    /// The size field is unusable; answer with a size error and drop the connection.
    BadSize {
        prefixed: bool,
        why: String,
    },
    Io(io::Error),
}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::TimedOut {
            FrameError::Timeout
        } else {
            FrameError::Io(e)
        }
    }
}

enum ReadError {
    Eof,
    Timeout,
    Io(io::Error),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Eof => f.write_str("the peer closed the connection"),
            ReadError::Timeout => f.write_str("timed out"),
            ReadError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Reads `total` more bytes of a transfer in chunks, each within `timeout`.
fn read_chunks(s: &mut Stream, mut total: usize, timeout: Duration, mut f: impl FnMut(&[u8])) -> Result<(), ReadError> {
    const CHUNK: usize = 64 << 10;
    let mut buf = vec![0u8; total.min(CHUNK)];
    // `timeout` for each read, and for the whole transfer `timeout` per 64 KiB: a client that
    // trickles bytes cannot hold the control connection (and the loop serving it) for long.
    let end = Instant::now() + timeout.saturating_mul(1 + total.div_ceil(CHUNK) as u32);
    while total > 0 {
        let want = total.min(buf.len());
        match read_until(s, &mut buf[..want], Some((Instant::now() + timeout).min(end))) {
            Ok(0) => return Err(ReadError::Eof),
            Ok(n) => {
                f(&buf[..n]);
                total -= n;
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(ReadError::Timeout),
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    Ok(())
}

/// The big-endian u32 at `at`, 0 past the end (callers have checked the length).
fn be32(b: &[u8], at: usize) -> u32 {
    tpm::be32(b, at).unwrap_or_default()
}

impl Shared {
    fn engine(&self) -> MutexGuard<'_, Box<dyn TpmEngine>> {
        lock(&self.engine)
    }

    fn refresh_buffer_size(&self, eng: &mut dyn TpmEngine) {
        match eng.set_buffer_size(0) {
            Ok((now, _, _)) if now >= TPM_HEADER_SIZE as u32 => self.buffer_size.store(now, Ordering::SeqCst),
            Ok((now, _, _)) => log::warn!("engine reports an unusable buffer size {now}; keeping the old one"),
            Err(e) => log::warn!("cannot query the TPM buffer size: {e}"),
        }
    }

    fn locality_allowed(&self, loc: u8) -> bool {
        loc <= 4 && !(loc == 4 && self.cfg.locality.reject_locality_4)
    }

    fn capabilities(&self) -> u64 {
        let mut caps = ctrl::PTM_CAP_INIT
            | ctrl::PTM_CAP_SHUTDOWN
            | ctrl::PTM_CAP_GET_TPMESTABLISHED
            | ctrl::PTM_CAP_SET_LOCALITY
            | ctrl::PTM_CAP_HASHING
            | ctrl::PTM_CAP_CANCEL_TPM_CMD
            | ctrl::PTM_CAP_STORE_VOLATILE
            | ctrl::PTM_CAP_RESET_TPMESTABLISHED
            | ctrl::PTM_CAP_GET_STATEBLOB
            | ctrl::PTM_CAP_SET_STATEBLOB
            | ctrl::PTM_CAP_STOP
            | ctrl::PTM_CAP_GET_CONFIG
            | ctrl::PTM_CAP_SET_BUFFERSIZE;
        if self.cfg.fd_receiver.is_some() {
            caps |= ctrl::PTM_CAP_SET_DATAFD;
        }
        if self.version == TpmVersion::V2_0 {
            caps |= ctrl::PTM_CAP_SEND_COMMAND_HEADER;
        }
        caps
    }

    // ----- data channel -----

    fn read_frame(&self, s: &mut Stream) -> Result<Option<Frame>, FrameError> {
        let max = self.buffer_size.load(Ordering::SeqCst) as usize;
        // Room for the largest command, its TCG prefix and one more byte, so a single read
        // normally brings the whole command and shows any excess: the fast path is one
        // blocking read, no timeout syscalls.
        let mut buf = vec![0u8; max.max(TPM_HEADER_SIZE) + TCG_PREFIX_SIZE + 1];
        let mut got = loop {
            if let Some(n) = s.poll_read(&mut buf, self.cfg.poll) {
                break n;
            }
            // An idle client may wait as long as it likes before a command.
            match io::Read::read(s, &mut buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(FrameError::Io(e)),
                Ok(0) => return Ok(None),
                Ok(n) => break n,
            }
        };
        // The control channel may have changed the buffer size while we waited: judge the
        // command by the size in force now.
        let max = self.buffer_size.load(Ordering::SeqCst) as usize;
        let room = max.max(TPM_HEADER_SIZE) + TCG_PREFIX_SIZE + 1;
        if buf.len() < room {
            buf.resize(room, 0);
        }
        let mut reader = SlowReader { deadline: None, timeout: self.cfg.data_timeout };
        let result = self.parse_frame(s, &mut buf, &mut got, max, &mut reader);
        if reader.deadline.is_some() {
            // The slow path set a socket timeout; the next command waits without one.
            let _ = s.set_read_timeout(None);
        }
        result
    }

    fn parse_frame(
        &self,
        s: &mut Stream,
        buf: &mut [u8],
        got: &mut usize,
        max: usize,
        reader: &mut SlowReader,
    ) -> Result<Option<Frame>, FrameError> {
        reader.fill(s, buf, got, TPM_HEADER_SIZE).map_err(|e| e.unwrap_or(FrameError::Timeout))?;
        let mut start = 0;
        let mut prefix = None;
        let tag = u16::from_be_bytes([buf[0], buf[1]]);
        if self.version == TpmVersion::V2_0
            && tag != TPM2_ST_NO_SESSIONS
            && tag != TPM2_ST_SESSIONS
            && be32(buf, 0) == TPM2_SEND_COMMAND
        {
            // TCG prefix: command word, locality, length; the command starts at byte 9.
            reader
                .fill(s, buf, got, TCG_PREFIX_SIZE + TPM_HEADER_SIZE)
                .map_err(|e| e.unwrap_or(FrameError::Timeout))?;
            prefix = Some((buf[4], be32(buf, 5)));
            start = TCG_PREFIX_SIZE;
        }
        let prefixed = prefix.is_some();
        let size = be32(buf, start + 2) as usize;
        if size < TPM_HEADER_SIZE {
            return Err(FrameError::BadSize { prefixed, why: format!("size field {size} is smaller than a header") });
        }
        if size > max {
            return Err(FrameError::BadSize {
                prefixed,
                why: format!("command of {size} bytes exceeds the buffer size {max}"),
            });
        }
        if let Some((_, length)) = prefix {
            if length as usize != size {
                return Err(FrameError::BadSize {
                    prefixed,
                    why: format!("TCG prefix length {length} differs from the size field {size}"),
                });
            }
        }
        let end = start + size;
        if *got > end {
            return Err(FrameError::BadSize {
                prefixed,
                why: format!("more bytes arrived than the size field {size}"),
            });
        }
        reader.fill(s, buf, got, end).map_err(|e| {
            e.unwrap_or(FrameError::BadSize {
                prefixed,
                why: format!("size field says {size} bytes but fewer arrived within {:?}", self.cfg.data_timeout),
            })
        })?;
        Ok(Some(Frame { command: buf[start..end].to_vec(), prefix_locality: prefix.map(|(l, _)| l) }))
    }

    /// swtpm's in-band set-locality command.
    fn inband_set_locality(&self, command: &[u8]) -> Vec<u8> {
        if command.len() < TPM_HEADER_SIZE + 1 {
            let code = match self.version {
                TpmVersion::V2_0 => rc::TPM_RC_INSUFFICIENT,
                TpmVersion::V1_2 => rc::TPM_BAD_PARAM_SIZE,
            };
            return error_response(self.version, code);
        }
        if !self.cfg.locality.allow_set_locality {
            log::warn!("in-band TPM_CC_SET_LOCALITY refused (needs --locality allow-set-locality)");
            return fatal_error_response(self.version);
        }
        let loc = command[TPM_HEADER_SIZE];
        if !self.locality_allowed(loc) {
            log::warn!("in-band TPM_CC_SET_LOCALITY to {loc} refused");
            return error_response(self.version, locality_error_code(self.version));
        }
        self.locality.store(loc, Ordering::SeqCst);
        error_response(self.version, rc::TPM_SUCCESS)
    }

    /// Runs one data-channel command; `None` when the server is ending.
    fn execute(&self, frame: &Frame, peer: &str) -> Option<Vec<u8>> {
        let mut eng = self.engine();
        if self.ctl.terminating() {
            return None;
        }
        if !eng.is_running() {
            log::debug!("{peer}: command while the TPM is off");
            return Some(fatal_error_response(self.version));
        }
        if let Some(loc) = frame.prefix_locality {
            // swtpm takes the prefix's locality unchecked; we apply the --locality rules.
            if !self.locality_allowed(loc) {
                log::warn!("{peer}: TCG prefix asks for locality {loc}; refused");
                return Some(error_response(self.version, locality_error_code(self.version)));
            }
            self.locality.store(loc, Ordering::SeqCst);
        }
        let ordinal = be32(&frame.command, 6);
        if ordinal == TPM_CC_SET_LOCALITY {
            return Some(self.inband_set_locality(&frame.command));
        }
        let locality = self.locality.load(Ordering::SeqCst);
        match eng.process(locality, &frame.command) {
            Ok(r) => Some(r),
            Err(e) => {
                log::error!("{peer}: TPM command {ordinal:#x} failed: {e}");
                Some(fatal_error_response(self.version))
            }
        }
    }

    fn serve_data(&self, conn: DataConn) {
        let DataConn { mut stream, peer, keep } = conn;
        log::info!("data client {peer} connected");
        loop {
            let frame = match self.read_frame(&mut stream) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    log::info!("data client {peer} disconnected");
                    return;
                }
                Err(FrameError::Disconnected) => {
                    log::warn!("data client {peer} disconnected in the middle of a command");
                    return;
                }
                Err(FrameError::Timeout) => {
                    log::warn!("data client {peer} sent an incomplete command header; dropping the connection");
                    stream.close_gracefully();
                    return;
                }
                Err(FrameError::Io(e)) => {
                    if !self.ctl.terminating() {
                        log::warn!("data client {peer}: {e}; dropping the connection");
                    }
                    return;
                }
                Err(FrameError::BadSize { prefixed, why }) => {
                    log::warn!("data client {peer}: {why}; answering with a size error and dropping the connection");
                    let resp = error_response(self.version, size_error_code(self.version));
                    let _ = stream.write_all(&frame_response(&resp, prefixed));
                    stream.close_gracefully();
                    return;
                }
            };
            let Some(resp) = self.execute(&frame, &peer) else { return };
            if let Err(e) = stream.write_all(&frame_response(&resp, frame.prefix_locality.is_some())) {
                log::warn!("data client {peer}: cannot send the response: {e}; dropping the connection");
                return;
            }
            if !keep {
                log::debug!("data client {peer}: closing after the response (disconnect mode)");
                return;
            }
        }
    }

    fn data_loop(&self) {
        loop {
            let conn = {
                let mut h = lock(&self.ctl.handoff);
                loop {
                    if self.ctl.terminating() {
                        return;
                    }
                    if let Some(c) = h.datafd.take().or_else(|| h.accepted.take()) {
                        h.active = true;
                        break c;
                    }
                    h = self.ctl.handoff_cv.wait(h).unwrap_or_else(PoisonError::into_inner);
                }
            };
            // The main loop accepts the next data client only while none waits.
            self.ctl.wake();
            if self.ctl.track(&self.ctl.active_data, &conn.stream) {
                self.serve_data(conn);
            }
            *lock(&self.ctl.active_data) = None;
            lock(&self.ctl.handoff).active = false;
            if self.cfg.terminate_on_data_disconnect && !self.ctl.terminating() {
                log::info!("data connection lost; terminating (--terminate)");
                self.terminate_tpm();
                return;
            }
        }
    }

    /// A connection from a listener that `poll` found readable. `None` when the client went
    /// away first (the listener does not block) or accepting failed; a failure (say, out of
    /// descriptors) is logged and followed by a pause, since the listener stays readable.
    fn accept_one(&self, listener: &Listener, what: &str) -> Option<(Stream, String)> {
        match listener.accept() {
            Ok(a) => Some(a),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => None,
            Err(e) => {
                log::warn!("accepting a {what} connection failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                None
            }
        }
    }

    /// Gives an accepted data connection to the data thread (the main loop accepts only while
    /// no connection waits for it).
    fn hand_over(&self, stream: Stream, peer: String) {
        let mut h = lock(&self.ctl.handoff);
        if h.active || h.datafd.is_some() {
            log::info!("data client {peer} waits until the current client disconnects");
        }
        h.accepted = Some(DataConn { stream, peer, keep: !self.cfg.disconnect });
        drop(h);
        self.ctl.handoff_cv.notify_all();
    }

    /// `not-need-init` and `startup-*`: power on (and start up) before serving.
    fn power_on_at_start(&self) -> Result<()> {
        let mut eng = self.engine();
        if self.cfg.not_need_init || self.cfg.startup.is_some() {
            eng.init(false)?;
            log::info!("TPM powered on at start");
            if let Some(st) = self.cfg.startup {
                let resp = eng.process(0, &startup_command(self.version, st)?)?;
                match tpm::code(&resp) {
                    Some(0) => log::info!("sent startup {st:?}"),
                    code => log::warn!("startup {st:?} answered {code:x?}"),
                }
            }
        }
        self.refresh_buffer_size(eng.as_mut());
        Ok(())
    }

    /// Powers off and ends the server.
    fn terminate_tpm(&self) {
        self.ctl.terminate();
    }

    // ----- control channel -----

    /// Reads one control message the way swtpm does: what the first read brings, then more
    /// until the command's fixed part is there, all within `ctrl_timeout`.
    #[allow(clippy::type_complexity)]
    fn recv_ctrl(&self, s: &mut Stream) -> Result<Option<(u32, Vec<u8>, Option<OwnedFd>)>, String> {
        let mut buf = vec![0u8; ctrl::CTRL_INPUT_SIZE];
        let (mut got, fd) = match (&self.cfg.fd_receiver, s.as_unix()) {
            (Some(recv), Some(u)) => {
                u.set_read_timeout(None).map_err(|e| e.to_string())?;
                loop {
                    match (**recv)(u, &mut buf) {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e.to_string()),
                        Ok(r) => break r,
                    }
                }
            }
            _ => (read_until(s, &mut buf, None).map_err(|e| e.to_string())?, None),
        };
        if got == 0 {
            return Ok(None);
        }
        let deadline = Instant::now() + self.cfg.ctrl_timeout;
        while got < ctrl::message_len_needed(&buf[..got]) {
            match read_until(s, &mut buf[got..], Some(deadline)) {
                Ok(0) => return Err(format!("closed in the middle of a control message ({got} bytes)")),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return Err(format!("incomplete control message ({got} bytes) after {:?}", self.cfg.ctrl_timeout))
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        let code = be32(&buf, 0);
        buf.truncate(got);
        Ok(Some((code, buf.split_off(4), fd)))
    }

    fn running(&self) -> bool {
        self.engine().is_running()
    }

    fn reply_rc(code: u32) -> CtrlOutcome {
        CtrlOutcome::Reply(ctrl::encode_result(code).to_vec())
    }

    fn engine_rc(&self, what: &str, r: Result<()>) -> u32 {
        match r {
            Ok(()) => rc::TPM_SUCCESS,
            Err(e) => {
                log::warn!("{what} failed: {e}");
                result_code(&e)
            }
        }
    }

    /// Reads and discards `n` bytes of a transfer we refuse, so the stream stays in sync.
    /// False if that was not possible.
    fn drain(&self, s: &mut Stream, n: usize, peer: &str) -> bool {
        if n > self.cfg.max_state_blob {
            log::warn!("control client {peer}: refusing to read {n} bytes of a refused transfer");
            return false;
        }
        match read_chunks(s, n, self.cfg.data_timeout, |_| {}) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("control client {peer}: reading the rest of a refused transfer: {e}");
                false
            }
        }
    }

    fn handle_ctrl(&self, s: &mut Stream, peer: &str, code: u32, body: &[u8], fd: Option<OwnedFd>) -> CtrlOutcome {
        let Some(cmd) = CtrlCmd::from_code(code) else {
            log::warn!("control client {peer}: unknown command {code:#010x}");
            return Self::reply_rc(rc::TPM_BAD_ORDINAL);
        };
        log::debug!("control client {peer}: {} ({} bytes)", cmd.name(), body.len());
        if fd.is_some() && cmd != CtrlCmd::SetDatafd {
            log::warn!("control client {peer}: ignoring a file descriptor sent with {}", cmd.name());
        }
        let bad_parameter = || {
            log::warn!("control client {peer}: malformed {} ({} bytes of body)", cmd.name(), body.len());
            Self::reply_rc(rc::TPM_BAD_PARAMETER)
        };
        let not_running = || {
            log::debug!("control client {peer}: {} while the TPM is off", cmd.name());
            Self::reply_rc(rc::TPM_BAD_ORDINAL)
        };
        match cmd {
            CtrlCmd::GetCapability => CtrlOutcome::Reply(ctrl::encode_caps(self.capabilities()).to_vec()),
            CtrlCmd::Init => {
                let Some(req) = ctrl::InitRequest::decode(body) else { return bad_parameter() };
                let mut eng = self.engine();
                eng.shutdown();
                let delete_volatile = req.init_flags & ctrl::PTM_INIT_FLAG_DELETE_VOLATILE != 0;
                let code = match eng.init(delete_volatile) {
                    Ok(()) => {
                        self.refresh_buffer_size(eng.as_mut());
                        log::info!("TPM powered on (delete volatile state: {delete_volatile})");
                        rc::TPM_SUCCESS
                    }
                    Err(e) => {
                        log::error!("could not initialize the TPM: {e}");
                        result_code(&e)
                    }
                };
                Self::reply_rc(code)
            }
            CtrlCmd::Stop | CtrlCmd::Shutdown => {
                if !body.is_empty() {
                    return bad_parameter();
                }
                self.engine().shutdown();
                if cmd == CtrlCmd::Stop {
                    log::info!("TPM powered off (CMD_STOP)");
                    Self::reply_rc(rc::TPM_SUCCESS)
                } else {
                    log::info!("CMD_SHUTDOWN: powering off and terminating");
                    CtrlOutcome::ReplyAndTerminate(ctrl::encode_result(rc::TPM_SUCCESS).to_vec())
                }
            }
            CtrlCmd::GetTpmEstablished => {
                let mut eng = self.engine();
                if !eng.is_running() {
                    return not_running();
                }
                if !body.is_empty() {
                    return bad_parameter();
                }
                let resp = match eng.established() {
                    Ok(bit) => ctrl::EstResponse { tpm_result: rc::TPM_SUCCESS, bit: bit.into() },
                    Err(e) => {
                        log::warn!("get TPM established failed: {e}");
                        ctrl::EstResponse { tpm_result: result_code(&e), bit: 0 }
                    }
                };
                CtrlOutcome::Reply(resp.encode().to_vec())
            }
            CtrlCmd::ResetTpmEstablished => {
                let mut eng = self.engine();
                if !eng.is_running() {
                    return not_running();
                }
                let Some(&loc) = body.first() else { return bad_parameter() };
                if loc > 4 {
                    return Self::reply_rc(rc::TPM_BAD_LOCALITY);
                }
                Self::reply_rc(self.engine_rc("reset TPM established", eng.reset_established(loc)))
            }
            CtrlCmd::SetLocality => {
                let Some(&loc) = body.first() else { return bad_parameter() };
                if !self.locality_allowed(loc) {
                    log::warn!("control client {peer}: locality {loc} refused");
                    return Self::reply_rc(rc::TPM_BAD_LOCALITY);
                }
                self.locality.store(loc, Ordering::SeqCst);
                Self::reply_rc(rc::TPM_SUCCESS)
            }
            CtrlCmd::HashStart | CtrlCmd::HashEnd | CtrlCmd::StoreVolatile => {
                let mut eng = self.engine();
                if !eng.is_running() {
                    return not_running();
                }
                if !body.is_empty() {
                    return bad_parameter();
                }
                let r = match cmd {
                    CtrlCmd::HashStart => eng.hash_start(),
                    CtrlCmd::HashEnd => eng.hash_end(),
                    _ => eng.store_volatile(),
                };
                Self::reply_rc(self.engine_rc(cmd.name(), r))
            }
            CtrlCmd::HashData => self.hash_data(s, peer, body),
            CtrlCmd::CancelTpmCmd => {
                // A command in progress holds the engine; then the TPM is running.
                let running = match self.engine.try_lock() {
                    Ok(eng) => eng.is_running(),
                    Err(TryLockError::WouldBlock) => true,
                    Err(TryLockError::Poisoned(p)) => p.into_inner().is_running(),
                };
                if !running {
                    return not_running();
                }
                if !body.is_empty() {
                    return bad_parameter();
                }
                (*self.canceller)();
                log::info!("control client {peer}: cancelled the command in progress");
                Self::reply_rc(rc::TPM_SUCCESS)
            }
            CtrlCmd::GetStateBlob => self.get_state_blob(peer, body),
            CtrlCmd::SetStateBlob => self.set_state_blob(s, peer, body),
            CtrlCmd::GetConfig => {
                if !body.is_empty() {
                    return bad_parameter();
                }
                let flags = if self.cfg.file_key { ctrl::PTM_CONFIG_FLAG_FILE_KEY } else { 0 };
                CtrlOutcome::Reply(ctrl::GetConfigResponse { tpm_result: rc::TPM_SUCCESS, flags }.encode().to_vec())
            }
            CtrlCmd::SetDatafd => self.set_datafd(s, peer, fd),
            CtrlCmd::SetBufferSize => {
                let Some(req) = ctrl::SetBufferSizeRequest::decode(body) else { return bad_parameter() };
                let mut eng = self.engine();
                if req.buffersize > 0 && eng.is_running() {
                    log::warn!("control client {peer}: the buffer size can only be set while the TPM is off");
                    return Self::reply_rc(rc::TPM_BAD_ORDINAL);
                }
                match eng.set_buffer_size(req.buffersize) {
                    Ok((now, min, max)) => {
                        if now >= TPM_HEADER_SIZE as u32 {
                            self.buffer_size.store(now, Ordering::SeqCst);
                        }
                        let r = ctrl::SetBufferSizeResponse {
                            tpm_result: rc::TPM_SUCCESS,
                            buffersize: now,
                            minsize: min,
                            maxsize: max,
                        };
                        CtrlOutcome::Reply(r.encode().to_vec())
                    }
                    Err(e) => {
                        log::warn!("set buffer size failed: {e}");
                        Self::reply_rc(result_code(&e))
                    }
                }
            }
            CtrlCmd::GetInfo => {
                // The engine exposes no TPMLIB_GetInfo; we do not advertise PTM_CAP_GET_INFO.
                log::warn!("control client {peer}: CMD_GET_INFO is not implemented");
                Self::reply_rc(rc::TPM_BAD_ORDINAL)
            }
        }
    }

    fn hash_data(&self, s: &mut Stream, peer: &str, body: &[u8]) -> CtrlOutcome {
        let declared = (body.len() >= ctrl::PTM_HDATA_DATA_OFFSET).then(|| be32(body, 0) as usize);
        let first = body.get(ctrl::PTM_HDATA_DATA_OFFSET..).unwrap_or_default();
        let rest = declared.map_or(0, |d| d.saturating_sub(first.len()));
        if !self.running() {
            log::debug!("control client {peer}: CMD_HASH_DATA while the TPM is off");
            if !self.drain(s, rest, peer) {
                return CtrlOutcome::ReplyAndClose(ctrl::encode_result(rc::TPM_BAD_ORDINAL).to_vec());
            }
            return Self::reply_rc(rc::TPM_BAD_ORDINAL);
        }
        let Some(declared) = declared else {
            log::warn!("control client {peer}: CMD_HASH_DATA without a length");
            return Self::reply_rc(rc::TPM_BAD_PARAMETER);
        };
        if first.len() > declared {
            log::warn!("control client {peer}: CMD_HASH_DATA carries more than its length {declared}");
            return Self::reply_rc(rc::TPM_BAD_PARAMETER);
        }
        let mut result = self.engine().hash_data(first);
        let read = read_chunks(s, rest, self.cfg.data_timeout, |chunk| {
            if result.is_ok() {
                result = self.engine().hash_data(chunk);
            }
        });
        match read {
            Ok(()) => Self::reply_rc(self.engine_rc("hash data", result)),
            Err(e) => {
                log::warn!("control client {peer}: reading hash data: {e}");
                match e {
                    ReadError::Eof => CtrlOutcome::ReplyAndClose(ctrl::encode_result(rc::TPM_IOERROR).to_vec()),
                    _ => CtrlOutcome::Close,
                }
            }
        }
    }

    fn get_state_blob(&self, peer: &str, body: &[u8]) -> CtrlOutcome {
        let mut eng = self.engine();
        if !eng.is_running() {
            log::debug!("control client {peer}: CMD_GET_STATEBLOB while the TPM is off");
            return Self::reply_rc(rc::TPM_BAD_ORDINAL);
        }
        let Some(req) = ctrl::GetStateRequest::decode(body) else {
            log::warn!("control client {peer}: malformed CMD_GET_STATEBLOB");
            return Self::reply_rc(rc::TPM_BAD_PARAMETER);
        };
        let header_only = |code| {
            let h = ctrl::GetStateResponse { tpm_result: code, state_flags: 0, totlength: 0, length: 0 };
            CtrlOutcome::Reply(h.encode().to_vec())
        };
        let Some(kind) = blob_kind(req.blob_type) else {
            log::warn!("control client {peer}: unknown state blob type {}", req.blob_type);
            return header_only(rc::TPM_BAD_PARAMETER);
        };
        let plain = match eng.get_state(kind) {
            Ok(p) => p,
            Err(e) => {
                log::warn!("get state blob {kind:?} failed: {e}");
                return header_only(result_code(&e));
            }
        };
        drop(eng);
        if plain.is_empty() {
            // swtpm's answer when the blob does not exist.
            log::debug!("control client {peer}: no state blob {kind:?}");
            return header_only(rc::TPM_RETRY);
        }
        // Our blobs are never encrypted (PTM_STATE_FLAG_DECRYPTED changes nothing).
        let wrapped = blob::wrap(&plain);
        let part = wrapped.get(req.offset as usize..).unwrap_or_default();
        let h = ctrl::GetStateResponse {
            tpm_result: rc::TPM_SUCCESS,
            state_flags: 0,
            totlength: part.len() as u32,
            length: part.len() as u32,
        };
        let mut out = Vec::with_capacity(ctrl::PTM_GETSTATE_RESP_HDR_SIZE + part.len());
        out.extend_from_slice(&h.encode());
        out.extend_from_slice(part);
        log::info!("control client {peer}: sent state blob {kind:?} ({} bytes from offset {})", part.len(), req.offset);
        CtrlOutcome::Reply(out)
    }

    fn set_state_blob(&self, s: &mut Stream, peer: &str, body: &[u8]) -> CtrlOutcome {
        let req = ctrl::SetStateRequest::decode(body);
        let first = body.get(ctrl::PTM_SETSTATE_REQ_HDR_SIZE..).unwrap_or_default();
        let rest = req.map_or(0, |r| (r.length as usize).saturating_sub(first.len()));
        if self.running() {
            log::warn!("control client {peer}: CMD_SET_STATEBLOB while the TPM is running");
            if !self.drain(s, rest, peer) {
                return CtrlOutcome::ReplyAndClose(ctrl::encode_result(rc::TPM_BAD_ORDINAL).to_vec());
            }
            return Self::reply_rc(rc::TPM_BAD_ORDINAL);
        }
        let Some(req) = req else {
            log::warn!("control client {peer}: malformed CMD_SET_STATEBLOB");
            return Self::reply_rc(rc::TPM_BAD_PARAMETER);
        };
        let length = req.length as usize;
        if first.len() > length {
            log::warn!("control client {peer}: CMD_SET_STATEBLOB carries more than its length {length}");
            return Self::reply_rc(rc::TPM_BAD_PARAMETER);
        }
        if length > self.cfg.max_state_blob {
            log::warn!("control client {peer}: state blob of {length} bytes exceeds {}", self.cfg.max_state_blob);
            return CtrlOutcome::ReplyAndClose(ctrl::encode_result(rc::TPM_FAIL).to_vec());
        }
        let mut data = Vec::with_capacity(length);
        data.extend_from_slice(first);
        if let Err(e) = read_chunks(s, rest, self.cfg.data_timeout, |chunk| data.extend_from_slice(chunk)) {
            log::warn!("control client {peer}: reading a state blob ({} of {length} bytes): {e}", data.len());
            return match e {
                ReadError::Eof => CtrlOutcome::ReplyAndClose(ctrl::encode_result(rc::TPM_BAD_PARAMETER).to_vec()),
                _ => CtrlOutcome::Close,
            };
        }
        let Some(kind) = blob_kind(req.blob_type) else {
            log::warn!("control client {peer}: unknown state blob type {}", req.blob_type);
            return Self::reply_rc(rc::TPM_BAD_PARAMETER);
        };
        let plain = match blob::unwrap(&data, req.state_flags & ctrl::PTM_STATE_FLAG_ENCRYPTED != 0) {
            Ok(p) => p,
            Err(code) => {
                log::warn!("control client {peer}: state blob {kind:?} refused ({code:#x})");
                return Self::reply_rc(code);
            }
        };
        let code = self.engine_rc("set state blob", self.engine().set_state(kind, &plain));
        if code == rc::TPM_SUCCESS {
            log::info!("control client {peer}: received state blob {kind:?} ({} bytes)", plain.len());
        }
        Self::reply_rc(code)
    }

    fn set_datafd(&self, s: &Stream, peer: &str, fd: Option<OwnedFd>) -> CtrlOutcome {
        if self.cfg.fd_receiver.is_none() {
            log::error!(
                "control client {peer}: CMD_SET_DATAFD needs file descriptor passing, which this build \
                 does not support; use --server for the data channel"
            );
            return Self::reply_rc(rc::TPM_FAIL);
        }
        let mut h = lock(&self.ctl.handoff);
        if h.active || h.datafd.is_some() {
            log::warn!("control client {peer}: CMD_SET_DATAFD while a data connection is active");
            return Self::reply_rc(rc::TPM_IOERROR);
        }
        let Some(fd) = fd.filter(|_| s.as_unix().is_some()) else {
            log::warn!("control client {peer}: CMD_SET_DATAFD without a file descriptor");
            return Self::reply_rc(rc::TPM_BAD_PARAMETER);
        };
        let stream = Stream::Unix(UnixStream::from(fd));
        h.datafd = Some(DataConn { stream, peer: format!("{peer} (datafd)"), keep: true });
        drop(h);
        self.ctl.handoff_cv.notify_all();
        Self::reply_rc(rc::TPM_SUCCESS)
    }

    /// Reads and answers one message of the control connection `s`.
    fn ctrl_message(&self, s: &mut Stream, peer: &str) -> CtrlStep {
        let (code, body, fd) = match self.recv_ctrl(s) {
            Ok(Some(m)) => m,
            Ok(None) => {
                log::debug!("control client {peer} disconnected");
                return CtrlStep::Closed;
            }
            Err(why) => {
                if !self.ctl.terminating() {
                    log::warn!("control client {peer}: {why}; closing the connection");
                }
                return CtrlStep::Closed;
            }
        };
        let (reply, then) = match self.handle_ctrl(s, peer, code, &body, fd) {
            CtrlOutcome::Reply(r) => (Some(r), CtrlStep::Open),
            CtrlOutcome::ReplyAndClose(r) => (Some(r), CtrlStep::Drop),
            CtrlOutcome::Close => (None, CtrlStep::Drop),
            CtrlOutcome::ReplyAndTerminate(r) => (Some(r), CtrlStep::End),
        };
        if let Some(r) = reply {
            if let Err(e) = s.write_all(&r) {
                log::warn!("control client {peer}: cannot send the response: {e}");
                return match then {
                    CtrlStep::End => CtrlStep::End,
                    _ => CtrlStep::Closed,
                };
            }
        }
        then
    }

    /// The main loop: accepts data connections for the data thread and control connections,
    /// and serves the control connection, until the server is to end.
    fn main_loop(&self, data: Option<&Listener>, ctrl: Option<&Listener>) {
        let mut ctrl_conn: Option<(Stream, String)> = None;
        while !self.ctl.terminating() {
            // Accept a data client only while none waits for the data thread.
            let data = data.filter(|_| lock(&self.ctl.handoff).accepted.is_none());
            let ctrl_fd = match &ctrl_conn {
                Some((s, _)) => Some(s.as_fd()),
                None => ctrl.map(Listener::as_fd),
            };
            let fds: Vec<_> =
                [Some(self.ctl.wake_rx.as_fd()), data.map(Listener::as_fd), ctrl_fd].into_iter().flatten().collect();
            let ready = match crate::poll::wait_any(&fds) {
                Ok(r) => r,
                Err(e) => {
                    log::error!("waiting for clients failed: {e}; terminating");
                    break;
                }
            };
            let mut ready = ready.into_iter();
            if ready.next() == Some(true) {
                self.ctl.drain_wakes();
            }
            if let Some(l) = data {
                if ready.next() == Some(true) && !self.ctl.terminating() {
                    if let Some((stream, peer)) = self.accept_one(l, "data") {
                        self.hand_over(stream, peer);
                    }
                }
            }
            if ctrl_fd.is_none() || ready.next() != Some(true) || self.ctl.terminating() {
                continue;
            }
            match ctrl_conn.take() {
                None => {
                    let Some(l) = ctrl else { continue };
                    if let Some((stream, peer)) = self.accept_one(l, "control") {
                        log::debug!("control client {peer} connected");
                        // A client that does not read its answers must not hold the loop.
                        if let Err(e) = stream.set_write_timeout(Some(self.cfg.data_timeout)) {
                            log::warn!("control client {peer}: {e}");
                        }
                        if self.ctl.track(&self.ctl.active_ctrl, &stream) {
                            ctrl_conn = Some((stream, peer));
                        }
                    }
                }
                Some((mut stream, peer)) => {
                    match self.ctrl_message(&mut stream, &peer) {
                        CtrlStep::Open => {
                            ctrl_conn = Some((stream, peer));
                            continue;
                        }
                        CtrlStep::End => break,
                        CtrlStep::Drop => {
                            log::warn!("control client {peer}: dropping the connection");
                            stream.close_gracefully();
                        }
                        CtrlStep::Closed => drop(stream),
                    }
                    *lock(&self.ctl.active_ctrl) = None;
                    if self.cfg.terminate_on_ctrl_disconnect && !self.ctl.terminating() {
                        log::info!("control connection lost; terminating (--ctrl ...,terminate)");
                        break;
                    }
                }
            }
        }
        *lock(&self.ctl.active_ctrl) = None;
        self.terminate_tpm();
        // Clients that waited for the data thread, which is ending: close them now, not when
        // the last Stopper goes.
        let mut h = lock(&self.ctl.handoff);
        drop((h.accepted.take(), h.datafd.take()));
    }
}

/// What became of the control connection after a message.
enum CtrlStep {
    /// Keep serving it.
    Open,
    /// The client closed it, or it broke.
    Closed,
    /// Close it gracefully (the stream is out of sync).
    Drop,
    /// The server is to end (CMD_SHUTDOWN).
    End,
}

/// A response as sent on the data channel: with the TCG prefix's framing (length before,
/// a zero acknowledgement after) when the command came with the prefix.
fn frame_response(resp: &[u8], prefixed: bool) -> Vec<u8> {
    if !prefixed {
        return resp.to_vec();
    }
    let mut out = Vec::with_capacity(resp.len() + 8);
    out.extend_from_slice(&(resp.len() as u32).to_be_bytes());
    out.extend_from_slice(resp);
    out.extend_from_slice(&0u32.to_be_bytes());
    out
}

/// swtpm's socket server over a [`TpmEngine`]. Build with [`SwtpmServer::new`] (which binds
/// the sockets), then [`SwtpmServer::run`] until CMD_SHUTDOWN.
pub struct SwtpmServer {
    shared: Arc<Shared>,
    data: Option<(Listener, Endpoint)>,
    ctrl: Option<(Listener, Endpoint)>,
}

impl std::fmt::Debug for SwtpmServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwtpmServer")
            .field("version", &self.shared.version)
            .field("data", &self.data.as_ref().map(|d| &d.1))
            .field("ctrl", &self.ctrl.as_ref().map(|c| &c.1))
            .field("config", &self.shared.cfg)
            .finish()
    }
}

impl SwtpmServer {
    /// Binds the configured sockets. The TPM stays off until [`run`](Self::run) (with
    /// `not_need_init`/`startup`) or CMD_INIT powers it on.
    pub fn new(config: ServerConfig, engine: Box<dyn TpmEngine>) -> Result<Self> {
        if config.data.is_none() && config.ctrl.is_none() {
            return Err(Error::Config("neither a data channel (--server) nor a control channel (--ctrl) given".into()));
        }
        let version = engine.version();
        if let Some(st) = config.startup {
            startup_command(version, st)?;
        }
        let bind = |ep: &Option<Endpoint>| -> Result<Option<(Listener, Endpoint)>> {
            let Some(ep) = ep else { return Ok(None) };
            let l = Listener::bind(ep)?;
            let bound = l.endpoint(ep);
            Ok(Some((l, bound)))
        };
        let data = bind(&config.data)?;
        let ctrl = bind(&config.ctrl)?;
        if data.is_none() && config.fd_receiver.is_none() {
            log::warn!("no data channel: TPM commands can only arrive via CMD_SET_DATAFD, which is unavailable");
        }
        let canceller = engine.canceller();
        let shared = Arc::new(Shared {
            engine: Mutex::new(engine),
            canceller,
            version,
            locality: AtomicU8::new(0),
            buffer_size: AtomicU32::new(DEFAULT_BUFFER_SIZE),
            ctl: Arc::new(Control::new()?),
            cfg: config,
        });
        Ok(Self { shared, data, ctrl })
    }

    /// The data channel's endpoint as bound (the real port when 0 was asked for).
    pub fn data_endpoint(&self) -> Option<&Endpoint> {
        self.data.as_ref().map(|d| &d.1)
    }

    /// The control channel's endpoint as bound.
    pub fn ctrl_endpoint(&self) -> Option<&Endpoint> {
        self.ctrl.as_ref().map(|c| &c.1)
    }

    /// A handle that ends [`run`](Self::run) from another thread.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.shared.ctl.clone())
    }

    /// Serves until CMD_SHUTDOWN (or [`Stopper::stop`], or a lost connection with the
    /// terminate options), then powers the TPM off and removes Unix socket files.
    pub fn run(self) -> Result<()> {
        let shared = self.shared.clone();
        if let Err(e) = shared.power_on_at_start() {
            for (l, _) in self.data.iter().chain(self.ctrl.iter()) {
                l.remove_socket_file();
            }
            return Err(e);
        }
        let s = shared.clone();
        let data_thread = std::thread::Builder::new()
            .name("swtpm-data".into())
            .spawn(move || s.data_loop())
            .map_err(|e| Error::io("spawn the data thread", e))?;
        for (what, ch) in [("data", &self.data), ("control", &self.ctrl)] {
            if let Some((_, ep)) = ch {
                log::info!("{what} channel listening on {ep}");
            }
        }
        shared.main_loop(self.data.as_ref().map(|d| &d.0), self.ctrl.as_ref().map(|c| &c.0));
        if data_thread.join().is_err() {
            log::error!("the data thread panicked");
        }
        shared.engine().shutdown();
        for (l, _) in self.data.iter().chain(self.ctrl.iter()) {
            l.remove_socket_file();
        }
        log::info!("swtpm server terminated");
        Ok(())
    }
}
