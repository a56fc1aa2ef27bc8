//! Stub domains end to end under QEMU-emulated Xen (Xen 4.17, xl, xenstored and the guest's
//! stock xen-tpmfront from Debian): `xl create` of the manager's domain, which owns QEMU's TPM
//! (tpm-tis backed by Debian's swtpm) through `iomem=` and our `tis` driver, of a vTPM domain
//! with its state on its own disk, and of a guest with an ordinary `vtpm=` line. The guest runs
//! its tpm2-tools checks; the vTPM domain is destroyed under it (the guest gets an error, not a
//! hang), made again from its disk and the guest's device moved to it (`xl vtpm-detach` and
//! `vtpm-attach`): the running guest's TPM resumes with its PCRs as they were, dom0's
//! `xvtpmd --stub-domains-only` having told the new domain the guest's life. `xl save` and
//! `xl restore` of the guest: the restored guest's PCRs are as they were (the suspend reaches
//! the vTPM domain through xvtpmd). The rebooted guest finds its key and NV index, and reset
//! PCRs.
//! Images: tools/stubdom/build-images.sh via tests/harness/build-xen.sh (cached).

use std::path::PathBuf;

use xvtpm_tests::xen_qemu;

const XVTPM: &str = env!("CARGO_BIN_EXE_xvtpm");

#[test]
fn guest_with_vtpm_and_manager_in_stub_domains() {
    let img = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("xen-stubdom");
    let c =
        xen_qemu::run(&img, &xvtpm_tests::bins::vtpm_and_vtpmmgr(XVTPM), "stubdom", xen_qemu::Tpm::ForStubdom, 1500);
    let has = |s: &str| c.text.contains(s);
    assert!(has("manager domain serving"), "the manager's domain did not come up; {}", c.ctx());
    assert!(has("vtpmmgr: store /dev/xvda created"), "no store made on the manager's disk; {}", c.ctx());
    // The vTPM domain's identity provisioned from dom0 through the manager's domain (which
    // provisions nothing on its own); each command's device is removed after it.
    let v = "5e1f0a2b-7c3d-4e5f-8a9b-0c1d2e3f4a60";
    assert!(has(&format!("admin: provisioned {v} ")), "provisioning from dom0; {}", c.ctx());
    let show = |key: bool| format!("{{\"uuid\":\"{v}\",\"group\":0,\"has_key\":{key},\"exported\":false}}");
    assert!(has(&format!("admin: before the first start {}", show(false))), "{}", c.ctx());
    assert!(has("admin: devices left in xenstore: []"), "{}", c.ctx());
    assert!(has("vTPM domain serving"), "the vTPM domain did not come up; {}", c.ctx());
    assert!(has(&format!("admin: after the first start {}", show(true))), "its key at the manager; {}", c.ctx());
    assert!(has("created a V2_0 vTPM in /mnt/state.new (key at the manager)"), "{}", c.ctx());
    // The guest's tpm2-tools checks, through its stock xen-tpmfront to the vTPM domain.
    assert!(c.guest("devices /dev/tpm0"), "no /dev/tpm0 in the guest; {}", c.ctx());
    for ok in ["getrandom ok", "pcrextend ok", "createprimary ok", "evictcontrol ok", "nv ok", "DONE"] {
        assert!(c.guest(ok), "guest: no {ok:?}; {}", c.ctx());
    }
    assert!(
        c.guest("pcr16 0x5C85955F709283ECCE2B74F1B1552918819F390911816E7BB466805A38AB87F3"),
        "PCR 16 value; {}",
        c.ctx()
    );
    assert!(c.guest("unseal guest-secret-42") && c.guest("unseal refused after extend"), "{}", c.ctx());
    assert!(c.guest("abrmd two clients: a=3 b=3 of 3"), "tpm2-abrmd; {}", c.ctx());
    assert_eq!(c.value("dmesg-tpm-errors"), "0", "TPM errors in the guest's dmesg; {}", c.ctx());
    // The vTPM domain destroyed under the guest: an error in the guest, which keeps running.
    assert!(has("DESTROYED_ERROR") && !has("DESTROYED_HANG"), "{}", c.ctx());
    assert!(has("guest after the destroy: XVTPM-DOMU: loop"), "{}", c.ctx());
    // Made again from its disk, with its key from the manager, under the running guest: the
    // guest's TPM resumes from the snapshot on the disk, PCR 16 as before the destroy.
    assert!(has("state loaded from /mnt/state/managed-"), "the vTPM domain's restart; {}", c.ctx());
    assert!(has("guest's life as dom0's xvtpmd told the vTPM domain: /vm/"), "{}", c.ctx());
    let line = c.text.lines().find(|l| l.contains("REATTACHED pcr16 before")).unwrap_or_default();
    let words: Vec<&str> = line.split_whitespace().collect();
    let (before, after) = match words.iter().position(|w| *w == "before") {
        Some(i) => (words.get(i + 1).copied().unwrap_or(""), words.get(i + 3).copied().unwrap_or("")),
        None => ("", ""),
    };
    assert!(before.starts_with("0x") && before.len() == 66, "PCR 16 before the destroy: {line:?}; {}", c.ctx());
    let step = c.between("vTPM domain restarted", "saved after");
    assert_eq!(after, before, "PCR 16 of the running guest after its vTPM domain was made again; {step}");
    assert!(has("is resumed from snapshot"), "{}", c.ctx());
    // xl save and xl restore: the vTPM domain hears of the suspend from dom0's xvtpmd, and the
    // restored guest (a new domain) continues its TPM.
    let line = c.text.lines().find(|l| l.contains("RESTORED pcr16 before")).unwrap_or_default();
    let words: Vec<&str> = line.split_whitespace().collect();
    let restored = words.iter().position(|w| *w == "before").and_then(|i| words.get(i + 3)).copied().unwrap_or("");
    assert_eq!(restored, before, "PCR 16 after xl save and xl restore: {line:?}; {}", c.ctx());
    assert!(has("is being suspended") && has("continues"), "the vTPM domain followed the suspend; {}", c.ctx());
    // The rebooted guest: a new platform, reset PCRs, and what it made before is still there.
    assert!(c.guest("phase2 persistent key ok"), "persistent key lost; {}", c.ctx());
    assert!(c.guest("phase2 nv xvtpm-nv"), "NV index lost; {}", c.ctx());
    assert!(
        c.guest("phase2 pcr16 0x0000000000000000000000000000000000000000000000000000000000000000"),
        "the rebooted guest's PCR 16; {}",
        c.ctx()
    );
    // Every device removal completed without libxl's timeouts (driver domains remove their
    // backend directories).
    assert!(!has("timed out while waiting"), "libxl waited for a backend; {}", c.ctx());
    assert!(c.passed && has("RESULT PASS"), "{}", c.ctx());
}
