//! An HVM guest's TPM across the lives `vtpm serve-hvm` tells its handler about, on libtpms
//! with encrypted state and snapshot files: a boot is a new platform (even after a suspend of
//! the same guest: a saved guest created afresh rather than restored); a restore continues
//! the suspended TPM once, and a second restore of the same save is refused; a restart under
//! the running guest resumes it. The guest starts its TPM itself (TPM2_Startup), as an HVM
//! guest's firmware or kernel does. One test: libtpms holds one TPM per process.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use xvtpm_backend::{CancelProbe, CommandHandler, DeviceInfo, Request};
use xvtpm_tests::tpm2;
use xvtpm_vtpm::libtpms::{Libtpms, LibtpmsConfig};
use xvtpm_vtpm::snapshot::SnapshotFile;
use xvtpm_vtpm::state::file::{FileStore, StateKey};
use xvtpm_vtpm::tpmif::{HandlerConfig, VtpmHandler};
use xvtpm_vtpm::TpmVersion;
use xvtpm_xen::ShutdownReason;

const UUID: &str = "22222222-2222-4222-8222-222222222222";
/// TPM_RC_FAILURE: what a refused guest gets.
const TPM_RC_FAILURE: u32 = 0x101;

/// A vtpm process's handler over the state and snapshot directories of `dir`.
fn handler(dir: &Path, create: bool) -> Arc<VtpmHandler> {
    let state = dir.join("state");
    let key = StateKey::from_bytes(&[7u8; 32]).expect("key");
    let store = FileStore::open(&state, Some(key)).expect("store");
    let mut engine =
        Libtpms::new(LibtpmsConfig { version: TpmVersion::V2_0, store: Box::new(store), create, label: state.clone() })
            .expect("libtpms");
    xvtpm_vtpm::TpmEngine::init(&mut engine, true).expect("power on");
    let snapshots = SnapshotFile::for_state_dir(&dir.join("snapshots"), &state).expect("snapshots");
    VtpmHandler::new(
        Box::new(engine),
        HandlerConfig {
            max_locality: 0,
            snapshots: Some(snapshots),
            reset_running_guest: None,
            guest_starts_tpm: true,
        },
    )
}

/// Domain `domid` of the guest, whose `vm` path (its uuid) stays while `start` is its domain's.
fn domain(domid: u16, start: u32, running: bool) -> DeviceInfo {
    DeviceInfo {
        frontend: domid,
        handle: 0,
        uuid: UUID.into(),
        life: Some(format!("/vm/{UUID}@{start}")),
        adopted: running,
    }
}

fn run(h: &VtpmHandler, d: &DeviceInfo, cmd: &[u8]) -> Vec<u8> {
    let probe = CancelProbe::from_flag(Arc::new(AtomicBool::new(false)));
    h.handle(&Request::new(d, 0, cmd, 4096, &probe))
}

/// PCR 16 as the guest reads it, or the response code of a refusal.
fn pcr16(h: &VtpmHandler, d: &DeviceInfo) -> Result<Vec<u8>, u32> {
    let r = run(h, d, &tpm2::pcr_read_sha256(16));
    match tpm2::rc(&r) {
        0 => Ok(r[r.len() - 32..].to_vec()),
        rc => Err(rc),
    }
}

/// The guest's firmware starting its TPM, then PCR 16 extended once with `byte`.
fn boot_and_extend(h: &VtpmHandler, d: &DeviceInfo, byte: u8) -> Vec<u8> {
    assert_eq!(tpm2::rc(&run(h, d, &tpm2::startup_clear())), 0, "the guest starts a reset TPM");
    assert_eq!(tpm2::rc(&run(h, d, &tpm2::pcr_extend_sha256(16, &[byte; 32]))), 0);
    let p = pcr16(h, d).expect("PCR 16");
    assert_ne!(p, vec![0; 32]);
    p
}

#[test]
fn an_hvm_guests_tpm_follows_its_boots_restores_and_restarts() {
    let dir = std::env::temp_dir().join(format!("xvtpm-hvm-lifecycle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    // A boot, PCR 16 extended; the domain suspends (`xl save`) and its vtpm stops.
    let h = handler(&dir, true);
    let booted = domain(5, 100, false);
    h.new_platform(&booted);
    let saved = boot_and_extend(&h, &booted, 1);
    h.domain_shut_down(&booted, ShutdownReason::Suspend);
    h.stop();
    drop(h);

    // `xl restore`: a new domain with the same vm path, its device model started -incoming.
    let h = handler(&dir, false);
    let restored = domain(6, 200, true);
    h.connected(&restored);
    assert_eq!(h.refusal(), None, "resumed: what a migration's destination waits for");
    assert_eq!(pcr16(&h, &restored), Ok(saved.clone()), "the restored guest's TPM goes on");
    h.stop();
    drop(h);

    // The same save restored a second time: the suspended state was taken once; refused.
    let h = handler(&dir, false);
    let again = domain(7, 300, true);
    h.connected(&again);
    assert!(h.refusal().is_some(), "the refusal is told (serve-hvm writes it beside `ready`)");
    assert_eq!(pcr16(&h, &again), Err(TPM_RC_FAILURE), "a second restore is refused, never reset");
    drop(h);

    // Suspended again, then the saved guest created afresh (`xl create`, not a restore): a new
    // platform, though a suspended snapshot of the same vm path is there.
    let h = handler(&dir, false);
    let b2 = domain(8, 400, false);
    h.new_platform(&b2);
    boot_and_extend(&h, &b2, 2);
    h.domain_shut_down(&b2, ShutdownReason::Suspend);
    h.stop();
    drop(h);
    let h = handler(&dir, false);
    let fresh = domain(9, 500, false);
    h.new_platform(&fresh);
    assert_eq!(tpm2::rc(&run(&h, &fresh, &tpm2::startup_clear())), 0, "a reset TPM, not a started one");
    assert_eq!(pcr16(&h, &fresh), Ok(vec![0; 32]), "PCRs reset with the new platform");
    let before_kill = boot_and_extend_started(&h, &fresh, 3);
    // Killed under the running guest (no stop): the next vtpm resumes from the last snapshot.
    drop(h);
    let h = handler(&dir, false);
    let same = DeviceInfo { adopted: true, ..fresh.clone() };
    h.connected(&same);
    assert_eq!(pcr16(&h, &same), Ok(before_kill), "a restart under the running guest resumes it");
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

/// PCR 16 extended once more on a started TPM.
fn boot_and_extend_started(h: &VtpmHandler, d: &DeviceInfo, byte: u8) -> Vec<u8> {
    assert_eq!(tpm2::rc(&run(h, d, &tpm2::pcr_extend_sha256(16, &[byte; 32]))), 0);
    pcr16(h, d).expect("PCR 16")
}
