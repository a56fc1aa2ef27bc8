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
