//! QEMU as a real client: a Linux VM under qemu-system-x86_64 (TCG) whose TPM is
//! `-tpmdev emulator` + `-device tpm-crb` on our `vtpm socket`'s control socket (QEMU passes
//! the data channel with SET_DATAFD). The guest kernel's TPM driver finds a TPM 2.0, exposes
//! /dev/tpm0 and /dev/tpmrm0, and tpm2-tools work inside. The VM image comes from Debian
//! packages (tests/harness/build-tpm-vm.sh).

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

#[test]
fn linux_vm_uses_the_vtpm_through_qemu() {
    let img = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tpm-vm");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/harness/build-tpm-vm.sh");
    let built = Command::new("bash").arg(&script).arg(&img).status().expect("run build-tpm-vm.sh");
    assert!(built.success(), "building the VM image failed");

    let dir = std::env::temp_dir().join(format!("xvtpm-qemu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let (state, key) = (dir.join("state"), dir.join("key"));
    std::fs::write(&key, [4u8; 32]).expect("key");
    common::create(&state, &key);
    let ctrl = dir.join("ctrl.sock");
    let log = dir.join("vtpm.log");
    let mut vtpm = Command::new(common::VTPM)
        .args(["socket", "--tpm2", "--ctrl"])
        .arg(format!("type=unixio,path={}", ctrl.display()))
        .arg("--tpmstate")
        .arg(format!("dir={}", state.display()))
        .arg("--key")
        .arg(format!("file={},format=binary,mode=aes-256-cbc", key.display()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("vtpm socket");
    let end = Instant::now() + Duration::from_secs(20);
    // Ready on a successful connect: the file exists from bind(), before listen().
    while std::os::unix::net::UnixStream::connect(&ctrl).is_err() {
        assert!(Instant::now() < end, "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35", "-accel", "tcg", "-cpu", "qemu64", "-m", "512", "-smp", "1"])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(img.join("vmlinuz"))
        .arg("-initrd")
        .arg(img.join("initrd.gz"))
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4"])
        .arg("-chardev")
        .arg(format!("socket,id=chrtpm,path={}", ctrl.display()))
        .args(["-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-crb,tpmdev=tpm0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 (install qemu-system-x86)");
    let mut out = qemu.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let end = Instant::now() + Duration::from_secs(240);
    while qemu.try_wait().expect("wait").is_none() {
        if Instant::now() > end {
            let _ = qemu.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = qemu.wait();
    let console = reader.join().expect("reader");
    let _ = vtpm.kill();
    let _ = vtpm.wait();
    let lines: Vec<&str> = console.lines().filter_map(|l| l.trim().strip_prefix("XVTPM-VM: ")).collect();
    let ctx = || format!("console:\n{console}\nvtpm log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    eprintln!("guest reported:\n  {}", lines.join("\n  "));
    let has = |p: &str| lines.iter().any(|l| l.starts_with(p));
    assert!(has("DONE"), "the VM did not finish; {}", ctx());
    let devices = lines.iter().find(|l| l.starts_with("devices")).copied().unwrap_or("");
    assert!(
        devices.contains("/dev/tpm0") && devices.contains("/dev/tpmrm0") && !devices.contains("No such"),
        "{devices}\n{}",
        ctx()
    );
    assert!(has("tpm_version_major=2"), "{}", ctx());
    assert!(has("getrandom ok"), "{}", ctx());
    assert!(has("pcrextend ok") && has("createprimary ok"), "{}", ctx());
    let want = Sha256::new().chain_update([0u8; 32]).chain_update([1u8; 32]).finalize();
    let want: String = want.iter().map(|b| format!("{b:02X}")).collect();
    assert!(lines.iter().any(|l| *l == format!("pcr16 0x{want}")), "PCR 16 should be 0x{want}; {}", ctx());
    let _ = std::fs::remove_dir_all(&dir);
}
