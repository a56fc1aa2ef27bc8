//! Container vTPMs through Linux's vTPM proxy, in a Linux VM under qemu-system-x86_64 (TCG)
//! with Debian's kernel and its tpm_vtpm_proxy module: `xvtpm container create|stop|start|
//! destroy|list` run `vtpm proxy`; tpm2-tools use the devices through /dev/tpmrmN, two at a
//! time, and from a mount namespace holding only the device node; stopping a vTPM under its
//! clients gives them errors, not hangs; a restart keeps the state; a TPM 1.2 one answers TPM
//! 1.2 commands. The VM's script is tests/harness/proxy-vm-init.sh.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha1::Sha1;
use sha2::{Digest, Sha256};

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn container_vtpms_through_the_kernels_vtpm_proxy() {
    let bin = xvtpm_tests::bins::vtpm_and_vtpmmgr(env!("CARGO_BIN_EXE_xvtpm"));
    let img = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("proxy-vm");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/harness/build-proxy-vm.sh");
    let built = Command::new("bash").arg(&script).arg(&img).arg(&bin).status().expect("run build-proxy-vm.sh");
    assert!(built.success(), "building the VM image failed");

    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35", "-accel", "tcg", "-cpu", "qemu64", "-m", "512", "-smp", "1"])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(img.join("vmlinuz"))
        .arg("-initrd")
        .arg(img.join("initrd.gz"))
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4"])
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
    let end = Instant::now() + Duration::from_secs(600);
    while qemu.try_wait().expect("wait").is_none() {
        if Instant::now() > end {
            let _ = qemu.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = qemu.wait();
    let console = reader.join().expect("reader");
    let lines: Vec<&str> = console.lines().filter_map(|l| l.trim().strip_prefix("XVTPM-VM: ")).collect();
    eprintln!("the VM reported:\n  {}", lines.join("\n  "));
    let ctx = || format!("console:\n{console}");
    let line = |p: &str| {
        lines.iter().find(|l| l.starts_with(p)).copied().unwrap_or_else(|| panic!("no line {p:?}; {}", ctx()))
    };
    assert!(lines.contains(&"DONE"), "the VM did not finish; {}", ctx());
    assert_eq!(line("vtpmx"), "vtpmx /dev/vtpmx");
    // The kernel registered every device without a TPM error (our vtpm starts the TPM before
    // the kernel's self test).
    assert!(!console.contains("A TPM error"), "{}", ctx());

    // Created: the kernel made both nodes of each, and says they are TPM 2.0.
    for who in ["a", "b"] {
        let d = line(&format!("devices {who} "));
        assert!(d.contains("/dev/tpm") && d.contains("/dev/tpmrm") && !d.contains("No such"), "{d}");
    }
    let create_a = line("create ca ");
    for k in ["\"running\":true", "\"version\":\"2.0\"", "\"major\":", "\"rm_major\":", "\"pid\":"] {
        assert!(create_a.contains(k), "{create_a} lacks {k}");
    }
    assert_eq!(line("a tpm_version_major="), "a tpm_version_major=2");
    let random = line("a getrandom ").strip_prefix("a getrandom ok ").unwrap_or_else(|| panic!("{}", ctx()));
    assert!(random.len() == 32 && random.chars().all(|c| c.is_ascii_hexdigit()), "{random}");

    // Independent: the PCR extended in one is untouched in the other.
    let extended = Sha256::new().chain_update([0u8; 32]).chain_update([1u8; 32]).finalize();
    let extended = format!("0x{}", hex(&extended).to_uppercase());
    let zero = format!("0x{}", "0".repeat(64));
    assert_eq!(line("a pcr16 "), format!("a pcr16 {extended}"));
    assert_eq!(line("b pcr16 "), format!("b pcr16 {zero}"));

    // Two concurrent clients through /dev/tpmrmN: every command of both answered.
    assert_eq!(line("concurrent "), "concurrent client1 15/15 client2 15/15");
    assert_eq!(line("a persistent key "), "a persistent key ok");
    assert_eq!(line("a nv "), "a nv ok");

    // A mount namespace with only its node: /dev holds tpmrm0 and the TPM answers there.
    let ns = line("namespace ");
    assert!(ns.contains("dev=[tpmrm0 ]"), "{ns}");
    assert!(ns.contains(&format!("pcr16={extended}")), "{ns}");

    // Stop under clients: the device goes away; the client holding it open gets an error on
    // its next command, the one opening it anew too; neither hangs; the other vTPM goes on.
    assert!(line("held before stop: ").starts_with("held before stop: 80010000001400000000"), "{}", ctx());
    assert_eq!(line("stop ca "), "stop ca stopped ca");
    assert!(line("stop took ").ends_with("devices now []"), "{}", line("stop took "));
    assert!(line("held after stop: ").starts_with("held after stop: error"), "{}", ctx());
    let looped = line("loop after stop: ");
    assert!(!looped.contains("HANG") && looped.len() > "loop after stop: ".len(), "{looped}");
    assert_eq!(line("b after stopping a: "), format!("b after stopping a: {zero}"));
    let listed = line("list stopped ");
    assert!(listed.contains("{\"name\":\"ca\",\"running\":false,\"key\":\"file\",\"version\":\"2.0\"}"), "{listed}");
    assert!(listed.contains("{\"name\":\"cb\",\"running\":true"), "{listed}");

    // Restarted from its state: what was made persists; PCRs start over, as at a reboot.
    assert!(line("start ca ").contains("\"running\":true"), "{}", ctx());
    assert_eq!(line("restart persistent key "), "restart persistent key ok");
    assert_eq!(line("restart nv "), "restart nv xvtpm-ok");
    assert_eq!(line("restart pcr16 "), format!("restart pcr16 {zero}"));

    // SIGUSR1 cancels the command in progress; the TPM goes on serving.
    let cancel = line("cancel ");
    assert!(cancel.contains("0x909") && !cancel.contains("rc=0"), "{cancel}");
    assert!(line("after cancel ").len() == "after cancel ".len() + 8, "{}", line("after cancel "));

    // TPM 1.2: registered as such; TPM_Extend and TPM_PCRRead answered with the right value.
    assert!(line("create c12 ").contains("\"version\":\"1.2\""), "{}", ctx());
    assert_eq!(line("c12 tpm_version_major="), "c12 tpm_version_major=1");
    // The kernel's own TPM 1.2 commands (its sysfs `pcrs`) are answered too.
    assert_eq!(line("c12 sysfs pcr10 "), format!("c12 sysfs pcr10 {}", "0".repeat(40)));
    let pcr10 = hex(&Sha1::new().chain_update([0u8; 20]).chain_update([1u8; 20]).finalize());
    assert_eq!(line("c12 extend "), format!("c12 extend 00c40000001e00000000{pcr10}"));
    assert_eq!(line("c12 pcrread "), format!("c12 pcrread 00c40000001e00000000{pcr10}"));

    let list = line("list [");
    for n in ["ca", "cb", "c12"] {
        assert!(list.contains(&format!("{{\"name\":\"{n}\",\"running\":true")), "{list}");
    }
    assert_eq!(line("destroy cb "), "destroy cb destroyed cb");
    let after = line("after destroy: ");
    assert!(after.contains(" [] list ") && !after.contains("\"cb\""), "{after}");
    assert_eq!(line("stop nosuch exit "), "stop nosuch exit 3");
}
