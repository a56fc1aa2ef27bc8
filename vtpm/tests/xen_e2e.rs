//! End to end under QEMU-emulated Xen: Xen 4.17, xenstored, xl and the guest's stock Linux
//! xen-tpmfront from Debian packages; our `vtpm serve` in dom0 on the real /dev/xen interfaces
//! is the guest's vTPM; tpm2-tools in the guest use /dev/tpm0. Images are built by
//! tests/harness/build-xen.sh (cached) and booted by tests/harness/boot-xen.sh (TCG).

use std::path::{Path, PathBuf};

use xvtpm_tests::xen_qemu;

const VTPM: &str = env!("CARGO_BIN_EXE_vtpm");

#[test]
fn xen_guest_uses_our_vtpm() {
    let img = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("xen-e2e");
    let c = xen_qemu::run(&img, Path::new(VTPM).parent().expect("bin dir"), "e2e", xen_qemu::Tpm::None, 1200);
    let console = &c.text;
    let ctx = || c.ctx();
    let guest = |p: &str| c.guest(p);
    assert!(guest("DONE"), "the guest did not finish; {}", ctx());
    assert!(guest("devices /dev/tpm0"), "no /dev/tpm0 in the guest; {}", ctx());
    assert!(guest("getrandom ok") && guest("pcrextend ok") && guest("createprimary ok"), "{}", ctx());
    // PCR 16 after one extend with 32 bytes of 0x01 from zero.
    assert!(
        guest("pcr16 0x5C85955F709283ECCE2B74F1B1552918819F390911816E7BB466805A38AB87F3"),
        "PCR 16 value; {}",
        ctx()
    );
    // The guest kernel's own TPM 1.2 probe is answered: real timeouts and durations, a working
    // TPM hwrng, no TPM errors in dmesg.
    let value = |p: &str| c.value(p);
    let nonzero = |s: &str, n: usize| {
        let v: Vec<u64> = s.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        v.len() == n && v.iter().all(|x| *x > 0)
    };
    assert!(nonzero(&value("timeouts"), 4), "sysfs timeouts {:?}; {}", value("timeouts"), ctx());
    assert!(nonzero(&value("durations"), 3), "sysfs durations {:?}; {}", value("durations"), ctx());
    assert!(
        value("hwrng").starts_with("tpm-rng") && value("hwrng").len() > 40,
        "hwrng {:?}; {}",
        value("hwrng"),
        ctx()
    );
    assert_eq!(value("dmesg-tpm-errors"), "0", "TPM errors in the guest's dmesg; {}", ctx());
    // Sealed to PCR 16: unsealed while PCR 16 holds, refused once it changed.
    assert!(guest("unseal guest-secret-42"), "unseal; {}", ctx());
    assert!(guest("unseal refused after extend"), "unseal after the PCR changed; {}", ctx());
    // tpm2-abrmd in the guest, on /dev/tpm0, serves two tpm2-tools clients at once.
    assert!(guest("abrmd two clients: a=3 b=3 of 3"), "tpm2-abrmd; {}", ctx());
    // After destroy + create with the same uuid, the guest finds its persistent key and NV data.
    assert!(guest("evictcontrol ok") && guest("nv ok"), "{}", ctx());
    assert!(guest("phase2 persistent key ok"), "persistent key lost across the guest reboot; {}", ctx());
    assert!(guest("phase2 nv xvtpm-nv"), "NV index lost across the guest reboot; {}", ctx());
    // The rebooted guest is a new domain: the vtpm that served the last one resets its PCRs.
    assert!(
        guest(&format!("phase2 pcr16 0x{}", "0".repeat(64))),
        "the rebooted guest found the last guest's PCR 16; {}",
        ctx()
    );
    assert!(guest("DONE2"), "{}", ctx());
    // The vtpm killed and restarted while the guest runs; a second vTPM attached and detached.
    // ...on the TPM as it was: the restarted vtpm resumed it (PCR 16 kept), not reset it.
    assert!(
        c.report().iter().any(|l| l.contains("vtpm killed after guest loop") && l.contains("PCR 16 0x")),
        "the guest's PCR 16 before the kill; {}",
        ctx()
    );
    assert!(
        console.contains("RESTART_OK") && console.contains("PCR 16 kept"),
        "guest commands did not resume on its TPM as it was after the vtpm restart; {}",
        ctx()
    );
    assert!(console.contains("ATTACH_OK"), "vtpm-attach; {}", ctx());
    let listed = console.lines().any(|l| {
        l.contains("vtpm-list: 1")
            && l.contains("5e1f0a2b-7c3d-4e5f-8a9b-0c1d2e3f4a5c")
            && l.split_whitespace().nth(5) == Some("4")
    });
    assert!(listed, "xl vtpm-list shows the attached device Connected; {}", ctx());
    // The attached vTPM is a TPM 1.2: the guest kernel registers it as one and its sysfs files
    // (real TPM 1.2 commands: GetCapability, PCRRead) are answered by libtpms' TPM 1.2.
    assert!(guest("tpm1 version_major=1 caps Manufacturer: 0x49424d00;TCG version: 1.2"), "TPM 1.2 device; {}", ctx());
    assert!(guest("tpm1 24 pcrs, enabled=1 active=1"), "TPM 1.2 PCRs and flags; {}", ctx());
    assert!(console.contains("DETACH_OK"), "vtpm-detach; {}", ctx());
    assert!(!console.contains("xl: libxl: error"), "xl reported an error (e.g. the backend did not close); {}", ctx());
    assert!(c.passed && console.contains("RESULT PASS"), "{}", ctx());
}
