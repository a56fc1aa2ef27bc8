//! `xvtpm migrate` of an HVM guest between two Xen hosts, each under its own QEMU (TCG, SVM
//! with nested paging) with its own TPM, manager and xvtpmd from the package, one emulated
//! network between them. The guest (a TPM 2.0 from the wrapper's line) extends PCR 16, loads a
//! signing key and seals a secret to PCR 16, then ticks; after the move its ticks at the
//! destination go on with the same PCR 16, the key still loaded and signing, the secret
//! unsealing; the destination's xvtpmd serves the vTPM, its manager holds the key; the source
//! keeps nothing of it (no domain, vtpm, key at its manager, nor directory).
//! Scenario: tests/harness/xen-migrate-dom0-init.sh. Not in `.ci/run` (feature `hvm-tests`,
//! for the reason the `hvm` scenario is not): `cargo test -p xvtpm-tools --features hvm-tests
//! --test hvm_migrate`.

use std::path::PathBuf;

use xvtpm_tests::xen_qemu;

const XVTPM: &str = env!("CARGO_BIN_EXE_xvtpm");
const UUID: &str = "44444444-4444-4444-8444-444444444444";

/// The first reported line containing `key`, from `key` on.
fn line<'a>(c: &'a xen_qemu::Console, key: &str) -> &'a str {
    c.report().into_iter().find_map(|l| l.find(key).map(|i| &l[i..])).unwrap_or("")
}

/// The guest's ticks reported with `who` (`SRC`/`DST`): (number, PCR 16, sign, unseal).
fn ticks(c: &xen_qemu::Console, who: &str) -> Vec<(u32, String, String, String)> {
    let prefix = format!("XVTPM-DOMU: {who} tick ");
    c.report()
        .into_iter()
        .filter_map(|l| l.trim().strip_prefix(&prefix))
        .filter_map(|t| {
            let w: Vec<&str> = t.split_whitespace().collect();
            // N pcr16 P sign S unseal U ...
            Some((w.first()?.parse().ok()?, w.get(2)?.to_string(), w.get(4)?.to_string(), w.get(6)?.to_string()))
        })
        .collect()
}

#[test]
fn an_hvm_guest_moves_to_another_host_with_its_tpm() {
    let bins = xvtpm_tests::bins::vtpm_and_vtpmmgr(XVTPM);
    let img = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("xen-migrate");
    xen_qemu::package_into(&img, &bins);
    // As in the `hvm` scenario: a run in which the nested emulation triple-faulted an HVM
    // guest (here mostly while its memory is tracked for the move) is tried once more.
    let (src, dst) = xen_qemu::run_pair(&img, &bins, "migrate", 2400);
    let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&src, &dst)));
    if let Err(e) = first {
        if !src.text.contains(TRIPLE_FAULT) && !dst.text.contains(TRIPLE_FAULT) {
            std::panic::resume_unwind(e);
        }
        eprintln!("RETRY: an HVM guest triple-faulted under nested emulation; the scenario runs once more");
        let (src, dst) = xen_qemu::run_pair(&img, &bins, "migrate", 2400);
        check(&src, &dst);
    }
}

/// What Xen prints when an HVM guest's vCPU triple-faults.
const TRIPLE_FAULT: &str = "Triple fault - invoking HVM shutdown action";

fn check(src: &xen_qemu::Console, dst: &xen_qemu::Console) {
    let ctx = || format!("{}\n== dst ==\n{}", src.ctx(), dst.ctx());
    assert!(line(src, "xen up (src)").contains("hvm hap"), "{}", ctx());
    assert!(line(dst, "MIGKEY src key").ends_with("pinned"), "dst trusts src's manager: {}", ctx());

    // At the source: the guest ticked with its TPM, then moved.
    let before = ticks(src, "SRC");
    let expect = line(dst, "MIGEXPECT ").trim_start_matches("MIGEXPECT ").trim().to_string();
    assert!(expect.starts_with("0x") && expect.len() == 66, "PCR 16 before the move: {expect:?}; {}", ctx());
    assert!(before.iter().any(|t| t.1 == expect && t.2 == "ok"), "the guest used its TPM at src: {}", ctx());
    let moved = line(src, "MIGT ");
    assert!(moved.starts_with("MIGT xvtpm migrate exit 0 "), "{moved}; {}", ctx());

    // At the destination: the same guest (its ticks go on), the same TPM.
    let after = ticks(dst, "DST");
    assert!(!after.is_empty(), "the guest ticks at dst: {}", ctx());
    let last_src = before.iter().map(|t| t.0).max().unwrap_or(0);
    for (n, pcr, sign, unseal) in &after {
        assert!(*n > last_src, "tick {n} after {last_src}: the guest went on, it did not boot again; {}", ctx());
        assert_eq!(pcr, &expect, "PCR 16 at dst (tick {n}); {}", ctx());
        assert_eq!(sign, "ok", "the key loaded at src signs at dst (tick {n}); {}", ctx());
        assert_eq!(unseal, "sealed-to-pcr16", "the secret sealed at src unseals (tick {n}); {}", ctx());
    }
    let status = line(dst, "MIGDST status ");
    assert!(
        status.contains(&format!("\"uuid\":\"{UUID}\""))
            && status.contains("\"hvm\":true")
            && status.contains("running"),
        "dst's xvtpmd serves it: {status}; {}",
        ctx()
    );
    let kept = line(dst, "MIGDST manager ");
    assert!(kept.starts_with("MIGDST manager 1 files "), "dst's manager holds its key: {kept}; {}", ctx());
    assert!(kept.contains("made") && kept.contains("state") && !kept.contains("arriving"), "{kept}; {}", ctx());

    // Nothing of it is left at the source.
    let left = line(src, "MIGSRC ");
    assert!(!left.contains("mig:"), "no domain at src: {left}; {}", ctx());
    assert!(
        left.ends_with("vtpms 0 manager 0 dir 1 snapshots 1"),
        "no vtpm, key, directory nor snapshot at src: {left}; {}",
        ctx()
    );
    eprintln!("FIGURES: {moved}");
}
