//! Our MMIO driver against real device emulation: a Linux VM under qemu-system-x86_64 (TCG)
//! with QEMU's `tpm-tis` backed by Debian's swtpm in TPM 2.0 and in TPM 1.2 mode, and with
//! `tpm-crb` (TPM 2.0). The guest kernel's tpm_tis/tpm_crb are kept off the device
//! (`initcall_blacklist=`); `tpm-mmio-check` drives the registers through /dev/mem and the
//! host recomputes and compares every result. The VM image is built from Debian packages by
//! tests/harness/build-tis-vm.sh.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use xvtpm_tis::Family;

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Built once per run: the tests run in parallel and share it.
fn image() -> PathBuf {
    static IMAGE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    IMAGE.get_or_init(build_image).clone()
}

fn build_image() -> PathBuf {
    let img = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tis-vm");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/harness/build-tis-vm.sh");
    let st = Command::new("bash")
        .arg(&script)
        .arg(&img)
        .arg(env!("CARGO_BIN_EXE_tpm-mmio-check"))
        .status()
        .expect("run build-tis-vm.sh");
    assert!(st.success(), "building the VM image failed");
    img
}

/// Boots the VM with `device` backed by a fresh swtpm of `family`; returns the guest's
/// XVTPM-TIS pairs and the whole console for diagnostics.
fn boot(img: &Path, device: &str, family: Family, tag: &str) -> (Vec<(String, String)>, String) {
    let dir = std::env::temp_dir().join(format!("xvtpm-tis-vm-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("state")).expect("dir");
    let ctrl = dir.join("ctrl.sock");
    let mut swtpm = Command::new("swtpm");
    swtpm.arg("socket");
    if family == Family::Tpm20 {
        swtpm.arg("--tpm2");
    }
    let _swtpm = Kill(
        swtpm
            .arg("--tpmstate")
            .arg(format!("dir={}", dir.join("state").display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", ctrl.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("swtpm (apt-get install swtpm)"),
    );
    let end = Instant::now() + Duration::from_secs(20);
    // Ready on a successful connect: the file exists from bind(), before listen().
    while std::os::unix::net::UnixStream::connect(&ctrl).is_err() {
        assert!(Instant::now() < end, "swtpm made no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut qemu = Kill(
        Command::new("qemu-system-x86_64")
            .args(["-machine", "q35", "-accel", "tcg", "-cpu", "qemu64", "-m", "256", "-smp", "1"])
            .args(["-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot"])
            .arg("-kernel")
            .arg(img.join("vmlinuz"))
            .arg("-initrd")
            .arg(img.join("initrd.gz"))
            .args(["-append", "console=ttyS0 panic=-1 loglevel=4 initcall_blacklist=init_tis,crb_acpi_driver_init"])
            .arg("-chardev")
            .arg(format!("socket,id=chrtpm,path={}", ctrl.display()))
            .args(["-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", &format!("{device},tpmdev=tpm0")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-system-x86_64 (apt-get install qemu-system-x86)"),
    );
    let mut out = qemu.0.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let end = Instant::now() + Duration::from_secs(300);
    while qemu.0.try_wait().expect("wait").is_none() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(qemu);
    let console = reader.join().expect("reader");
    let _ = std::fs::remove_dir_all(&dir);
    let kv = console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("XVTPM-TIS: "))
        .map(|l| match l.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (l.to_string(), String::new()),
        })
        .collect();
    (kv, console)
}

fn check(device: &str, family: Family, interface: &str) {
    let img = image();
    let (kv, console) = boot(&img, device, family, &format!("{device}-{family}"));
    eprintln!("{device} / TPM {family}: guest reported:");
    for (k, v) in &kv {
        eprintln!("  {k}={v}");
    }
    let get = |k: &str| kv.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    let ctx = || format!("console:\n{console}");
    assert!(get("DONE").is_some(), "the VM did not finish; {}", ctx());
    assert_eq!(get("exit"), Some("0"), "tpm-mmio-check failed; {}", ctx());
    assert_eq!(get("kernel-tpm-devices"), Some(""), "the guest kernel bound a TPM driver; {}", ctx());
    assert_eq!(get("interface"), Some(interface), "{}", ctx());
    assert_eq!(get("vendor"), Some("0x1014"), "QEMU's TPM is IBM's; {}", ctx());
    let bad = common::verify(&kv, common::Expect { family, localities: device == "tpm-tis" });
    assert!(bad.is_empty(), "mismatches: {bad:#?}\n{}", ctx());
    match family {
        // The driver must use the timing the TPM reports (µs), not the TIS defaults.
        Family::Tpm12 => {
            let ms = |k: &str| -> String {
                let v = get(k).unwrap_or_default().split(',').map(|us| us.parse::<u64>().unwrap_or(0) / 1000);
                v.map(|x| x.to_string()).collect::<Vec<_>>().join(",")
            };
            assert_eq!(get("timeouts_ms"), Some(ms("reported_timeouts_us").as_str()), "{}", ctx());
            assert_eq!(get("durations_ms"), Some(ms("reported_durations_us").as_str()), "{}", ctx());
            assert_ne!(get("timeouts_ms"), Some("750,2000,750,750"), "not the defaults; {}", ctx());
        }
        Family::Tpm20 => assert_eq!(get("timeouts_ms"), Some("750,2000,200,30"), "PTP defaults; {}", ctx()),
    }
    if device == "tpm-tis" {
        assert_eq!(get("max_buffer"), Some("4096"), "the TPM's buffer size; {}", ctx());
    }
}

#[test]
fn tis_with_tpm2() {
    check("tpm-tis", Family::Tpm20, "PtpFifo");
}

#[test]
fn tis_with_tpm12() {
    check("tpm-tis", Family::Tpm12, "Tis");
}

#[test]
fn crb_with_tpm2() {
    check("tpm-crb", Family::Tpm20, "Crb");
}
