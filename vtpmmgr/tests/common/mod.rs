//! Debian's swtpm as the hardware TPM.

// Each test binary compiles this module and uses a different part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use xvtpm_tests::swtpm::SwtpmProcess;
use xvtpm_tis::swtpm::{Address, Swtpm};
use xvtpm_tis::{Family, HwTpm};

/// A running swtpm; killed on drop.
pub struct HwSwtpm {
    proc: SwtpmProcess,
    /// Its directory.
    pub dir: PathBuf,
    family: Family,
}

impl HwSwtpm {
    /// Starts a fresh swtpm (TPM 2.0) in `dir`.
    pub fn start(dir: &Path) -> Self {
        Self::start_family(dir, Family::Tpm20)
    }

    /// Starts a fresh swtpm of `family` in `dir`.
    pub fn start_family(dir: &Path, family: Family) -> Self {
        let proc = SwtpmProcess::start(dir, family == Family::Tpm20).expect("swtpm (apt-get install swtpm)");
        HwSwtpm { proc, dir: dir.to_path_buf(), family }
    }

    /// A connection to it.
    pub fn connect(&self) -> Box<dyn HwTpm + Send> {
        Box::new(
            Swtpm::connect(&Address::Unix(self.proc.data.clone()), &Address::Unix(self.proc.ctrl.clone()), self.family)
                .expect("connect to swtpm"),
        )
    }

    /// The `--tpm` argument for the vtpmmgr binary.
    pub fn arg(&self) -> String {
        format!("swtpm:{},{}", self.proc.data.display(), self.proc.ctrl.display())
    }
}

/// A fresh temporary directory.
pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("xvtpm-mgr-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmpdir");
    d
}

/// Opens the store at `path` (created if `create`). A store this test closed a moment ago
/// may still read as locked: a process that a test running in parallel spawns holds a copy
/// of every descriptor until it execs, and the lock lives as long as any copy. So "in use" is
/// retried for a few seconds.
pub fn dev(path: &Path, create: bool) -> xvtpm_vtpmmgr::store::dev::FileDev {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match xvtpm_vtpmmgr::store::dev::FileDev::open(path, create) {
            Ok(d) => return d,
            Err(e) if e.to_string().contains("in use") && std::time::Instant::now() < end => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("store {}: {e}", path.display()),
        }
    }
}

/// The vtpmmgr binary of this build.
pub const VTPMMGR: &str = env!("CARGO_BIN_EXE_vtpmmgr");

/// A process killed (and reaped) when dropped.
pub struct Daemon(pub std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `vtpmmgr init` of a new store at `store` on `hw`, sealed to `pcrs` (e.g. "0,16").
pub fn init_store(store: &Path, hw: &HwSwtpm, pcrs: &str) {
    let out = std::process::Command::new(VTPMMGR)
        .args(["init", "--pcrs", pcrs, "--store"])
        .arg(store)
        .args(["--tpm", &hw.arg()])
        .output()
        .expect("vtpmmgr init");
    assert!(out.status.success(), "init: {}", String::from_utf8_lossy(&out.stderr));
}

/// `vtpmmgr serve --xen` of a store sealed to PCR 0, as domain `domid` of the simulated Xen in
/// `sim`, logging to `log`: returns once it watches xenstore.
pub fn serve_xen(store: &Path, hw: &HwSwtpm, sim: &Path, domid: u16, log: &Path) -> Daemon {
    let child = std::process::Command::new(VTPMMGR)
        .args(["serve", "--pcrs", "0", "--xen", "--domid", &domid.to_string(), "--sim"])
        .arg(sim)
        .arg("--store")
        .arg(store)
        .args(["--tpm", &hw.arg()])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("vtpmmgr serve");
    let d = Daemon(child);
    let text = || std::fs::read_to_string(log).unwrap_or_default();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !text().contains("watching") {
        assert!(std::time::Instant::now() < end, "manager did not start: {}", text());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    d
}
