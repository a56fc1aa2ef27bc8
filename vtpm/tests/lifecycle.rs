//! The guest's vTPM across its whole life, under QEMU-emulated Xen (Xen 4.17, xl, the guest's
//! stock xen-tpmfront): our vtpm stopped with SIGTERM and restarted, killed with -9 and
//! restarted, the guest saved and restored with `xl save` / `xl restore`; after each, PCR 16
//! is as it was and a key the guest loaded before still signs. Where the TPM cannot be resumed
//! (the snapshot gone), the running guest is refused, not reset, until it reboots.
//! Scenario: tests/harness/xen-lifecycle-dom0-init.sh.

use std::path::{Path, PathBuf};

use xvtpm_tests::xen_qemu;

const VTPM: &str = env!("CARGO_BIN_EXE_vtpm");

#[test]
fn the_guests_tpm_survives_vtpm_restarts_and_save_restore() {
    let img = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("xen-lifecycle");
    let c = xen_qemu::run(&img, Path::new(VTPM).parent().expect("bin dir"), "lifecycle", xen_qemu::Tpm::None, 1500);
    let ctx = || c.ctx();
    let ready = c.value("lc ready");
    assert!(ready.starts_with("pcr16 0x") && ready.contains(" key 0x80"), "the guest's start: {ready:?}; {}", ctx());
    let pcr16 = ready.split_whitespace().nth(1).unwrap_or_default().to_string();
    assert_ne!(pcr16, format!("0x{}", "0".repeat(64)), "{}", ctx());
    let event = |name: &str| -> String {
        c.report()
            .iter()
            .find_map(|l| l.split(&format!("LC {name} after ")).nth(1))
            .unwrap_or_else(|| panic!("no report of {name}; {}", ctx()))
            .to_string()
    };
    for name in ["sigterm", "kill9", "restore"] {
        let e = event(name);
        assert!(
            e.contains(&format!("pcr16 {pcr16} sign ok unseal sealed-to-pcr16")),
            "after {name}: PCR 16 must be {pcr16} and the key loaded before must sign: {e}; {}",
            ctx()
        );
    }
    // The suspend came from the hypervisor (the guest's shutdown reason, through privcmd), not
    // from a xenstore node the guest writes.
    assert!(c.text.contains("domain 1 shut down (suspend)"), "the vtpm heard of the suspend from Xen; {}", ctx());
    let refused = event("refused");
    assert!(refused.contains("pcr16 none sign failed"), "the refused guest: {refused}; {}", ctx());
    assert!(c.text.contains("cannot be resumed"), "the vtpm's log names the refusal; {}", ctx());
    let rebooted = event_line(&c, "LC rebooted: ");
    assert!(rebooted.contains(&format!("pcr16 {pcr16} sign ok")), "the rebooted guest: {rebooted}; {}", ctx());
    assert!(c.passed && c.text.contains("RESULT PASS"), "{}", ctx());
}

fn event_line(c: &xen_qemu::Console, prefix: &str) -> String {
    c.report().iter().find_map(|l| l.split(prefix).nth(1)).unwrap_or("").to_string()
}
