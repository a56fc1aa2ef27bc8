//! Shared pieces of the cross-crate tests: the test handler the simulated backend serves, and
//! helpers to run backend and frontend processes on a simulated Xen.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use xvtpm_backend::{CommandHandler, Request};

pub mod bins;
pub mod clayout;
pub mod procstat;
pub mod swtpm;
pub mod tpm2;
pub mod xen_qemu;

/// Commands starting with this marker make [`TestHandler`] work slowly (up to 30 s), stopping
/// early when the frontend cancels.
pub const SLOW_MARKER: &[u8] = b"XVSLOWXV";
/// Commands starting with this marker make [`TestHandler`] sleep 20 s ignoring cancellation,
/// like an engine stuck in a long operation.
pub const STUCK_MARKER: &[u8] = b"XVSTUCKX";
/// The response to a slow command that ran to completion.
pub const SLOW_DONE: &[u8] = b"DONE";

/// Echoes every command, except slow ones (see [`SLOW_MARKER`]).
#[derive(Debug, Default)]
pub struct TestHandler;

impl CommandHandler for TestHandler {
    fn handle(&self, req: &Request<'_>) -> Vec<u8> {
        if req.command.starts_with(SLOW_MARKER) {
            let end = Instant::now() + Duration::from_secs(30);
            while Instant::now() < end {
                if req.is_cancelled() {
                    log::info!("{}: slow command cancelled", req.device);
                    return b"CANCELLED".to_vec();
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            return SLOW_DONE.to_vec();
        }
        if req.command.starts_with(STUCK_MARKER) {
            std::thread::sleep(Duration::from_secs(20));
            return SLOW_DONE.to_vec();
        }
        req.command.to_vec()
    }
}

/// A backend process serving a simulated Xen, its stderr (the log) captured in a file.
#[derive(Debug)]
pub struct BackendProcess {
    child: Child,
    log: PathBuf,
}

impl BackendProcess {
    /// Starts `exe` (the `xvtpm-sim-backend` binary) as domain `domid` of the simulation in
    /// `dir` and waits until it watches xenstore.
    pub fn start(exe: &Path, dir: &Path, domid: u16, extra: &[&str]) -> anyhow::Result<Self> {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = dir.join(format!("backend-{domid}-{n}.log"));
        let log_file = std::fs::File::create(&log)?;
        let mut child = Command::new(exe)
            .arg("--dir")
            .arg(dir)
            .arg("--domid")
            .arg(domid.to_string())
            .args(extra)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "READY" {
            let _ = child.kill();
            anyhow::bail!(
                "backend did not start: {line:?}; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Ok(BackendProcess { child, log })
    }

    /// Everything the backend logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; returns whether it did within `timeout`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process (as `kill -9` would).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the `xvtpm-sim-frontend` binary to completion; returns (success, stdout, stderr).
pub fn run_frontend(
    exe: &Path,
    dir: &Path,
    domid: u16,
    handle: u32,
    args: &[&str],
) -> anyhow::Result<(bool, String, String)> {
    let out = Command::new(exe)
        .arg("--dir")
        .arg(dir)
        .arg("--domid")
        .arg(domid.to_string())
        .arg("--handle")
        .arg(handle.to_string())
        .args(args)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Two consecutive free TCP ports on 127.0.0.1 (swtpm's data and control channels).
///
/// Taken below the kernel's ephemeral range: a port the kernel handed out for `bind(0)` and
/// that was closed again is the next one another test's `bind(0)` or `connect` may get before
/// the server under test binds it (seen failing full runs). Below that range only other
/// callers of this function compete, and each process and call starts at a different place.
pub fn free_port_pair() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()))
        .unwrap_or(32768);
    let (first, last) = (10_000u32, low.saturating_sub(2));
    if last <= first {
        return Err(std::io::Error::other("no ports below the ephemeral range"));
    }
    let span = last - first;
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let mut at = (std::process::id().wrapping_mul(7919) ^ nanos).wrapping_add(call.wrapping_mul(2 * 977)) % span;
    for _ in 0..200 {
        let p = u16::try_from(first + at).map_err(std::io::Error::other)?;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(p) && free(p + 1) {
            return Ok(p);
        }
        at = (at + 2 * 131) % span;
    }
    Err(std::io::Error::other("no two free consecutive ports on 127.0.0.1"))
}

/// Median and 99th percentile of samples (sorted in place).
pub fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort_unstable();
    if samples.is_empty() {
        return (Duration::ZERO, Duration::ZERO);
    }
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.99))
}

/// A frontend driven by hand, for tests that play a broken or hostile guest: every step of the
/// handshake is separate so a test can skip or falsify any of them.
#[derive(Debug)]
pub struct RawFrontend {
    /// The domain's xenstore connection.
    pub xs: xvtpm_xen::Xenstore,
    /// Its event channel handle.
    pub evtchn: Box<dyn xvtpm_xen::EventChannel>,
    /// The granted page.
    pub page: xvtpm_xen::SharedPage,
    /// The unbound port allocated for the backend.
    pub port: u32,
    /// `device/vtpm/<handle>` of the domain.
    pub fe_path: String,
    /// The backend directory.
    pub be_path: String,
}

impl RawFrontend {
    /// Grants a page to `backend` and allocates a port, publishing nothing yet.
    pub fn new(xen: &dyn xvtpm_xen::Xen, backend: u16, handle: u32) -> anyhow::Result<Self> {
        let xs = xen.xenstore()?;
        let page = xen.grant_allocator()?.grant(backend, true)?;
        let evtchn = xen.evtchn()?;
        let port = evtchn.alloc_unbound(backend)?;
        Ok(RawFrontend {
            xs,
            evtchn,
            page,
            port,
            fe_path: xvtpm_xen::xenbus::vtpm_frontend_path(xen.domid(), handle),
            be_path: xvtpm_xen::xenbus::vtpm_backend_path(backend, xen.domid(), handle),
        })
    }

    /// Writes a key of the frontend directory.
    pub fn write(&self, key: &str, value: &str) -> anyhow::Result<()> {
        Ok(self.xs.write(xvtpm_xen::TxId::NONE, &format!("{}/{key}", self.fe_path), value.as_bytes())?)
    }

    /// Publishes the real ring-ref, event-channel and protocol v2, then Initialised.
    pub fn publish(&self) -> anyhow::Result<()> {
        self.publish_keys()?;
        self.write("state", "3")
    }

    /// Writes the ring's keys (ring-ref, event-channel, feature-protocol-v2), not the state.
    pub fn publish_keys(&self) -> anyhow::Result<()> {
        self.write("ring-ref", &self.page.gref().to_string())?;
        self.write("event-channel", &self.port.to_string())?;
        self.write("feature-protocol-v2", "1")
    }

    /// The backend's xenbus state, if readable.
    pub fn backend_state(&self) -> Option<xvtpm_xen::XenbusState> {
        let p = format!("{}/state", self.be_path);
        let raw = self.xs.try_read(xvtpm_xen::TxId::NONE, &p).ok()??;
        xvtpm_xen::XenbusState::parse(&p, &raw).ok()
    }

    /// Waits until the backend reaches `want`.
    pub fn wait_backend(&self, want: xvtpm_xen::XenbusState, timeout: Duration) -> bool {
        xvtpm_xen::sim::toolstack::wait_for_state(&self.xs, &format!("{}/state", self.be_path), want, timeout)
    }

    /// Writes a command, SUBMIT, and notifies, without waiting.
    pub fn submit(&self, cmd: &[u8]) -> anyhow::Result<()> {
        use xvtpm_xen::tpmif::{Tpmif, TpmifState};
        let t = Tpmif::new(&self.page);
        t.write_request(0, cmd)?;
        t.set_state(TpmifState::Submit)?;
        Ok(self.evtchn.notify(self.port)?)
    }

    /// Sends a well-formed command and waits for FINISH; returns the response.
    pub fn command(&self, cmd: &[u8], timeout: Duration) -> anyhow::Result<Vec<u8>> {
        use xvtpm_xen::tpmif::{Tpmif, TpmifState};
        let t = Tpmif::new(&self.page);
        self.submit(cmd)?;
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if t.state()? == TpmifState::Finish {
                let mut out = Vec::new();
                t.read_packet(&mut out)?;
                return Ok(out);
            }
            if let Some(p) = self.evtchn.wait(Some(Duration::from_millis(20)))? {
                self.evtchn.unmask(p)?;
            }
        }
        anyhow::bail!("no response within {timeout:?} (page state {:?})", t.raw_state()?)
    }
}
