//! Debian's swtpm in TPM 2.0 mode as the hardware TPM.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use xvtpm_tis::swtpm::{Address, Swtpm};
use xvtpm_tis::{Family, HwTpm};

/// A running swtpm; killed on drop.
pub struct HwSwtpm {
    child: Child,
    /// Its directory.
    pub dir: PathBuf,
    data: PathBuf,
    ctrl: PathBuf,
    family: Family,
}

impl Drop for HwSwtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl HwSwtpm {
    /// Starts a fresh swtpm (TPM 2.0) in `dir`.
    pub fn start(dir: &Path) -> Self {
        Self::start_family(dir, Family::Tpm20)
    }

    /// Starts a fresh swtpm of `family` in `dir`.
    pub fn start_family(dir: &Path, family: Family) -> Self {
        std::fs::create_dir_all(dir.join("state")).expect("dir");
        let (data, ctrl) = (dir.join("data.sock"), dir.join("ctrl.sock"));
        let mut cmd = Command::new("swtpm");
        cmd.arg("socket");
        if family == Family::Tpm20 {
            cmd.arg("--tpm2");
        }
        let child = cmd
            .args(["--flags", "not-need-init"])
            .arg("--tpmstate")
            .arg(format!("dir={}", dir.join("state").display()))
            .arg("--server")
            .arg(format!("type=unixio,path={}", data.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", ctrl.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("swtpm (apt-get install swtpm)");
        let end = Instant::now() + Duration::from_secs(20);
        while !(data.exists() && ctrl.exists()) {
            assert!(Instant::now() < end, "swtpm did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        HwSwtpm { child, dir: dir.to_path_buf(), data, ctrl, family }
    }

    /// A connection to it.
    pub fn connect(&self) -> Box<dyn HwTpm + Send> {
        Box::new(
            Swtpm::connect(&Address::Unix(self.data.clone()), &Address::Unix(self.ctrl.clone()), self.family)
                .expect("connect to swtpm"),
        )
    }

    /// The `--tpm` argument for the vtpmmgr binary.
    pub fn arg(&self) -> String {
        format!("swtpm:{},{}", self.data.display(), self.ctrl.display())
    }
}

/// A fresh temporary directory.
pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("xvtpm-mgr-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmpdir");
    d
}
