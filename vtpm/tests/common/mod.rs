//! Shared by the integration tests: running `vtpm socket` on free ports.

// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const VTPM: &str = env!("CARGO_BIN_EXE_vtpm");

/// Creates a TPM 2.0 vTPM state with `vtpm create`.
pub fn create(state: &Path, key: &Path) {
    create_version(state, key, true)
}

/// Creates a vTPM state (TPM 2.0 or 1.2) with `vtpm create`.
pub fn create_version(state: &Path, key: &Path, tpm2: bool) {
    let mut cmd = Command::new(VTPM);
    cmd.arg("create").arg("--state-dir").arg(state).arg("--key").arg(key);
    if !tpm2 {
        cmd.arg("--tpm1.2");
    }
    let out = cmd.output().expect("create");
    assert!(out.status.success(), "vtpm create: {}", String::from_utf8_lossy(&out.stderr));
}

pub struct Vtpm {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Drop for Vtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two free consecutive TCP ports (the swtpm TCTI uses port and port + 1).
pub fn free_ports() -> u16 {
    xvtpm_tests::free_port_pair().expect("free ports")
}

pub fn start(state: &Path, key: &Path, n: u32) -> Vtpm {
    start_version(state, key, n, true)
}

/// Starts `vtpm socket` (TPM 2.0 or 1.2) on free ports with swtpm's options and waits until
/// it listens; the TPM powered on and started.
pub fn start_version(state: &Path, key: &Path, n: u32, tpm2: bool) -> Vtpm {
    start_with(state, key, n, tpm2, "not-need-init,startup-clear")
}

/// [`start_version`] with swtpm's `--flags` as given.
pub fn start_with(state: &Path, key: &Path, n: u32, tpm2: bool, flags: &str) -> Vtpm {
    let port = free_ports();
    let log = state.with_extension(format!("log{n}"));
    let mut child = Command::new(VTPM)
        .arg("socket")
        .args(if tpm2 { &["--tpm2"][..] } else { &[][..] })
        .args(["--server", &format!("type=tcp,port={port}")])
        .args(["--ctrl", &format!("type=tcp,port={}", port + 1)])
        .arg("--tpmstate")
        .arg(format!("dir={}", state.display()))
        .arg("--key")
        .arg(format!("file={},format=binary,mode=aes-256-cbc", key.display()))
        .args(["--flags", flags])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("vtpm socket");
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Vtpm { child, port, log };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("vtpm socket did not listen:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
}

impl Vtpm {
    /// What the vtpm logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// kill -9.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
