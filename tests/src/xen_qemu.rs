//! The QEMU-emulated Xen of the end-to-end tests: builds a scenario's images
//! (`tests/harness/build-xen.sh`), boots it (`boot-xen.sh`) and reads what dom0 and the guests
//! reported on the serial console (lines containing `XVTPM-`).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The serial console of one boot.
#[derive(Debug)]
pub struct Console {
    /// The whole log.
    pub text: String,
    /// Whether QEMU exited with dom0's PASS.
    pub passed: bool,
}

fn harness() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("harness")
}

/// The machine's TPM (QEMU's tpm-tis behind a fresh swtpm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tpm {
    /// None.
    None,
    /// One dom0's kernel leaves alone: for the manager's stub domain (`iomem=`).
    ForStubdom,
    /// One dom0's kernel drives: `/dev/tpmrm0` for a manager in dom0.
    ForDom0,
}

/// Builds `scenario`'s images into `img` (cached) from the binaries in `bin_dir`, boots them
/// with `tpm` and returns the console.
pub fn run(img: &Path, bin_dir: &Path, scenario: &str, tpm: Tpm, timeout_s: u32) -> Console {
    build(img, bin_dir, scenario);
    let log = img.join("boot.log");
    let mut boot = Command::new("bash");
    boot.arg(harness().join("boot-xen.sh")).arg(img).arg(&log).arg(timeout_s.to_string());
    match tpm {
        Tpm::None => {}
        Tpm::ForStubdom => {
            boot.arg("tpm");
        }
        Tpm::ForDom0 => {
            boot.arg("tpm-dom0");
        }
    }
    let passed = boot.status().expect("boot-xen.sh").success();
    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).replace('\r', "");
    let console = Console { text, passed };
    eprintln!("{}", console.report().join("\n"));
    console
}

/// Builds `scenario`'s images into `img` and boots two machines from them, `src` and `dst`
/// (dom0's `xvtpm.role=`), each with its own TPM for dom0 and an e1000 on one QEMU socket
/// network between them (UDP on loopback: neither has to start first); returns their
/// consoles once both ended.
pub fn run_pair(img: &Path, bin_dir: &Path, scenario: &str, timeout_s: u32) -> (Console, Console) {
    build(img, bin_dir, scenario);
    let port = || std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("a free port").port();
    let (a, b) = (port(), port());
    let boot = |role: &str, net: String, mac: &str| {
        let log = img.join(format!("boot-{role}.log"));
        let child = Command::new("bash")
            .arg(harness().join("boot-xen.sh"))
            .arg(img)
            .arg(&log)
            .arg(timeout_s.to_string())
            .arg("tpm-dom0")
            .env("XVTPM_NET", net)
            .env("XVTPM_MAC", mac)
            .env("XVTPM_DOM0_ARGS", format!("xvtpm.role={role}"))
            .process_group(0)
            .spawn()
            .expect("boot-xen.sh");
        (Group(child), log)
    };
    let (mut src, src_log) = boot("src", format!("udp=127.0.0.1:{b},localaddr=127.0.0.1:{a}"), "52:54:00:12:34:01");
    let (mut dst, dst_log) = boot("dst", format!("udp=127.0.0.1:{a},localaddr=127.0.0.1:{b}"), "52:54:00:12:34:02");
    let console = |g: &mut Group, log: &Path| {
        let passed = g.0.wait().expect("boot-xen.sh").success();
        let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).replace('\r', "");
        Console { text, passed }
    };
    let (s, d) = (console(&mut src, &src_log), console(&mut dst, &dst_log));
    eprintln!("== src ==\n{}\n== dst ==\n{}", s.report().join("\n"), d.report().join("\n"));
    (s, d)
}

/// Builds (or finds cached) `scenario`'s images in `img`.
fn build(img: &Path, bin_dir: &Path, scenario: &str) {
    let built = Command::new("bash")
        .arg(harness().join("build-xen.sh"))
        .arg(img)
        .arg(bin_dir)
        .arg(scenario)
        .status()
        .expect("build-xen.sh");
    assert!(built.success(), "building the Xen images failed");
}

/// A boot in its own process group: killed whole (bash, QEMU, swtpm) if the test ends early.
struct Group(std::process::Child);

impl Drop for Group {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = Command::new("kill").args(["-s", "KILL", "--"]).arg(format!("-{}", self.0.id())).status();
            let _ = self.0.wait();
        }
    }
}

/// Builds the Debian package from the binaries in `bin_dir` (`scripts/package.sh`) and puts
/// it into `img` as `xvtpm.deb`, where `build-xen.sh`'s service and hvm scenarios take it. The
/// same binaries give the same .deb, so the image is rebuilt only when they change.
pub fn package_into(img: &Path, bin_dir: &Path) {
    std::fs::create_dir_all(img).expect("image dir");
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("repo").to_path_buf();
    let out = Command::new(repo.join("scripts/package.sh"))
        .arg("--bin-dir")
        .arg(bin_dir)
        .arg("--out")
        .arg(img.join("deb"))
        .output()
        .expect("package.sh");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deb = String::from_utf8_lossy(&out.stdout).trim().to_string();
    std::fs::copy(&deb, img.join("xvtpm.deb")).expect("the .deb into the image dir");
}

impl Console {
    /// The reported lines.
    pub fn report(&self) -> Vec<&str> {
        self.text.lines().filter(|l| l.contains("XVTPM-")).collect()
    }

    /// Whether the guest reported a line starting with `prefix`.
    pub fn guest(&self, prefix: &str) -> bool {
        self.report().iter().any(|l| l.trim().starts_with(&format!("XVTPM-DOMU: {prefix}")))
    }

    /// The rest of the guest's first line starting with `key `.
    pub fn value(&self, key: &str) -> String {
        self.report()
            .iter()
            .find_map(|l| l.trim().strip_prefix(&format!("XVTPM-DOMU: {key} ")))
            .unwrap_or("")
            .to_string()
    }

    /// The log from the first line containing `from` to the next one containing `to`, for
    /// assertion messages about a step in the middle of a long scenario.
    pub fn between(&self, from: &str, to: &str) -> String {
        let lines: Vec<&str> = self.text.lines().collect();
        let Some(a) = lines.iter().position(|l| l.contains(from)) else {
            return format!("(no {from:?} in the log) {}", self.ctx());
        };
        let b = lines[a..].iter().position(|l| l.contains(to)).map_or(lines.len(), |i| a + i + 1);
        format!("serial log from {from:?}:\n{}", lines[a..b].join("\n"))
    }

    /// The end of the log, for assertion messages.
    pub fn ctx(&self) -> String {
        let lines: Vec<&str> = self.text.lines().collect();
        format!("serial log tail:\n{}", lines[lines.len().saturating_sub(80)..].join("\n"))
    }
}
