//! The `HwTpm` over swtpm's sockets, with Debian's swtpm in TPM 2.0 and 1.2 mode: the same
//! checks the MMIO driver runs in the QEMU VM, localities set through CMD_SET_LOCALITY.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use xvtpm_tis::swtpm::{Address, Swtpm};
use xvtpm_tis::{selftest, Family, HwTpm};

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn swtpm(family: Family, tag: &str) -> (Kill, Swtpm, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("xvtpm-tis-swtpm-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let base = 20000 + (std::process::id() % 5000) as u16 * 2 + if family == Family::Tpm20 { 0 } else { 10000 };
    let mut cmd = Command::new("swtpm");
    cmd.arg("socket");
    if family == Family::Tpm20 {
        cmd.arg("--tpm2");
    }
    let child = cmd
        .args(["--server", &format!("type=tcp,port={base}"), "--ctrl", &format!("type=tcp,port={}", base + 1)])
        .arg("--tpmstate")
        .arg(format!("dir={}", dir.display()))
        .args(["--flags", "not-need-init"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("swtpm (apt-get install swtpm)");
    let child = Kill(child);
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        match Swtpm::connect(&Address::Tcp(base), &Address::Tcp(base + 1), family) {
            Ok(t) => return (child, t, dir),
            Err(e) if Instant::now() > end => panic!("swtpm did not start: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
fn tpm2_checks_through_swtpm() {
    let (_child, mut tpm, dir) = swtpm(Family::Tpm20, "2");
    let kv = selftest::run(&mut tpm);
    eprintln!("{kv:?}");
    let bad = common::verify(&kv, common::Expect { family: Family::Tpm20, localities: true });
    assert!(bad.is_empty(), "mismatches: {bad:#?}");
    assert!(tpm.describe().contains("swtpm"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn tpm12_checks_through_swtpm() {
    let (_child, mut tpm, dir) = swtpm(Family::Tpm12, "12");
    let kv = selftest::run(&mut tpm);
    eprintln!("{kv:?}");
    let bad = common::verify(&kv, common::Expect { family: Family::Tpm12, localities: true });
    assert!(bad.is_empty(), "mismatches: {bad:#?}");
    let _ = std::fs::remove_dir_all(dir);
}
