//! `vtpm serve` as a Xen backend process on the simulated Xen, a user-space tpmfront as the
//! guest: real TPM 2.0 commands through the shared page, state kept across vtpm restarts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use xvtpm_frontend::{Frontend, FrontendConfig};
use xvtpm_xen::sim::{toolstack, SimHost};
use xvtpm_xen::{ShutdownReason, TxId, Xen, XenbusState};

const VTPM: &str = env!("CARGO_BIN_EXE_vtpm");
const UUID: &str = "7a6b5c4d-3e2f-4a1b-8c0d-000000000007";

fn rc(rsp: &[u8]) -> u32 {
    u32::from_be_bytes([rsp[6], rsp[7], rsp[8], rsp[9]])
}

struct Proc(Child, PathBuf);

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(sim: &Path, state: &Path, key: &Path, n: u32) -> Proc {
    serve_with(sim, state, key, n, &[])
}

fn serve_with(sim: &Path, state: &Path, key: &Path, n: u32, extra: &[&str]) -> Proc {
    let log = sim.join(format!("vtpm-{n}.log"));
    let child = Command::new(VTPM)
        .args(["serve", "--uuid", UUID, "--domid", "0"])
        .args(extra)
        .arg("--snapshot-dir")
        .arg(sim.join("snapshots"))
        .arg("--sim")
        .arg(sim)
        .arg("--state-dir")
        .arg(state)
        .arg("--key")
        .arg(key)
        .stderr(std::fs::File::create(&log).expect("log"))
        .stdout(Stdio::null())
        .spawn()
        .expect("vtpm serve");
    Proc(child, log)
}

/// `vtpm create` of a TPM 2.0 in the simulation's directory, with a key file of `key_byte`:
/// (its state directory, its key file).
fn create(host: &SimHost, key_byte: u8) -> (PathBuf, PathBuf) {
    let state = host.dir().join("state");
    let key = host.dir().join("key");
    std::fs::write(&key, [key_byte; 32]).expect("key");
    let created = Command::new(VTPM)
        .arg("create")
        .arg("--state-dir")
        .arg(&state)
        .arg("--key")
        .arg(&key)
        .output()
        .expect("create");
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    (state, key)
}

fn wait_for(p: &Proc, needle: &str) {
    wait_for_nth(p, needle, 1);
}

/// Waits until `p` logged `needle` `n` times.
fn wait_for_nth(p: &Proc, needle: &str, n: usize) {
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if p.log().matches(needle).count() >= n {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("vtpm never logged {needle:?} {n} times:\n{}", p.log());
}

#[test]
fn guest_uses_the_vtpm_and_state_survives_restarts() {
    let host = SimHost::temp().expect("sim");
    let xs = host.xen(0).xenstore().expect("xs");
    let (state, key) = create(&host, 0x42);

    let vtpm = serve(host.dir(), &state, &key, 1);
    wait_for(&vtpm, "watching");
    let mut fe = guest(&host, &xs, 5);
    // The vTPM is started (TPM2_Startup was sent by vtpm serve): GetRandom works at once.
    let r = fe.transmit(&[0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 0x10]).expect("getrandom");
    assert_eq!((rc(&r), r.len()), (0, 28), "{r:02x?}");
    assert_eq!(rc(&fe.transmit(&xvtpm_tests::tpm2::change_owner_auth(b"", b"guest-secret")).expect("cmd")), 0);
    fe.close().expect("close");
    drop(vtpm);

    // A new vtpm process, same state: the owner password is still set.
    let vtpm = serve(host.dir(), &state, &key, 2);
    wait_for(&vtpm, "watching");
    let mut fe = reconnect(&host, 5);
    assert_ne!(
        rc(&fe.transmit(&xvtpm_tests::tpm2::change_owner_auth(b"", b"x")).expect("cmd")),
        0,
        "empty password refused"
    );
    assert_eq!(
        rc(&fe.transmit(&xvtpm_tests::tpm2::change_owner_auth(b"guest-secret", b"")).expect("cmd")),
        0,
        "kept password works"
    );
    fe.close().expect("close");
    let be_state = xs.read_string(TxId::NONE, "/local/domain/0/backend/vtpm/5/0/state").expect("state");
    assert_eq!(be_state, XenbusState::InitWait.as_str(), "waits for the guest again");
    drop(vtpm);

    // A corrupted state file: the vtpm refuses to start and says which file.
    let f = state.join("tpm2-permall.xvtpm");
    let mut bytes = std::fs::read(&f).expect("read");
    bytes[200] ^= 0xff;
    std::fs::write(&f, bytes).expect("write");
    let out = Command::new(VTPM)
        .args(["serve", "--uuid", UUID, "--domid", "0", "--sim"])
        .arg(host.dir())
        .arg("--state-dir")
        .arg(&state)
        .arg("--key")
        .arg(&key)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("tpm2-permall.xvtpm") && err.contains("does not authenticate"), "{err}");
}

/// TPM2_PCR_Reset of `pcr` with an empty password.
fn pcr_reset(pcr: u32) -> Vec<u8> {
    let mut c = vec![0x80, 0x02, 0, 0, 0, 27, 0, 0, 0x01, 0x3D];
    c.extend_from_slice(&pcr.to_be_bytes());
    c.extend_from_slice(&[0, 0, 0, 9, 0x40, 0, 0, 9, 0, 0, 0, 0, 0]);
    c
}

/// A guest used to pass any locality byte (0-255) to the TPM: at locality 2 it reset PCR 20,
/// and localities above 4 were taken. Now the device allows up to `--max-locality` (0 by
/// default), and the TPM answers TPM_RC_LOCALITY to anything above.
#[test]
fn a_guest_claims_only_the_localities_its_device_allows() {
    const RC_LOCALITY: u32 = 0x907;
    let host = SimHost::temp().expect("sim");
    let xs = host.xen(0).xenstore().expect("xs");
    let (state, key) = create(&host, 0x43);
    toolstack::add_domain(&xs, 5, "guest").expect("domain");
    toolstack::add_vtpm(&xs, 5, 0, 0, UUID).expect("vtpm device");
    let getrandom = [0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 0x10];

    let vtpm = serve(host.dir(), &state, &key, 1);
    wait_for(&vtpm, "watching");
    let mut fe = reconnect(&host, 5);
    for locality in [1, 2, 4, 5, 255] {
        fe.set_locality(locality);
        assert_eq!(rc(&fe.transmit(&pcr_reset(20)).expect("cmd")), RC_LOCALITY, "locality {locality}");
        assert_eq!(rc(&fe.transmit(&getrandom).expect("cmd")), RC_LOCALITY, "locality {locality}");
    }
    fe.set_locality(0);
    assert_eq!(rc(&fe.transmit(&getrandom).expect("cmd")), 0);
    assert!(vtpm.log().contains("command at locality 255 refused (this device allows up to 0)"), "{}", vtpm.log());
    fe.close().expect("close");
    drop(vtpm);

    // A device that allows up to 2: PCR 20 resets at 2 (the TPM's own rule), 3 is refused.
    let vtpm = serve_with(host.dir(), &state, &key, 2, &["--max-locality", "2"]);
    wait_for(&vtpm, "watching");
    let mut fe = reconnect(&host, 5);
    fe.set_locality(2);
    assert_eq!(rc(&fe.transmit(&pcr_reset(20)).expect("cmd")), 0);
    fe.set_locality(3);
    assert_eq!(rc(&fe.transmit(&getrandom).expect("cmd")), RC_LOCALITY);
    fe.close().expect("close");
    drop(vtpm);
    let refused = Command::new(VTPM).args(["serve", "--uuid", UUID, "--max-locality", "4"]).output().expect("run");
    assert!(!refused.status.success(), "locality 4 is the platform's");
}

/// PCR 16's sha256 value, read through the guest's frontend.
fn pcr16(fe: &mut Frontend) -> Vec<u8> {
    // TPM2_PCR_Read of PCR 16 in the sha256 bank.
    let cmd = [0x80, 0x01, 0, 0, 0, 0x14, 0, 0, 0x01, 0x7E, 0, 0, 0, 1, 0, 0x0B, 3, 0, 0, 1];
    let r = fe.transmit(&cmd).expect("PCR_Read");
    assert_eq!(rc(&r), 0, "PCR_Read");
    // update counter, the selection (4 + 2 + 1 + 3), the count, the size, the digest.
    r[r.len() - 32..].to_vec()
}

/// A TPM's PCRs reset with its platform only. The same guest reconnecting (its tpmfront
/// closes and opens again) keeps them; a new guest with the same vTPM (another domain: the
/// guest was rebooted or recreated) starts with them reset, as a platform reset would.
#[test]
fn a_new_guest_gets_reset_pcrs_and_a_reconnecting_one_keeps_them() {
    let host = SimHost::temp().expect("sim");
    let xs = host.xen(0).xenstore().expect("xs");
    let (state, key) = create(&host, 0x44);
    let vtpm = serve(host.dir(), &state, &key, 1);
    wait_for(&vtpm, "watching");
    let mut fe = guest(&host, &xs, 5);
    assert_eq!(pcr16(&mut fe), [0u8; 32]);
    let r = fe.transmit(&xvtpm_tests::tpm2::pcr_extend_sha256(16, &[0x16; 32])).expect("extend");
    assert_eq!(rc(&r), 0, "PCR_Extend");
    let extended = pcr16(&mut fe);
    assert_ne!(extended, [0u8; 32]);
    fe.close().expect("close");
    let mut fe = reconnect(&host, 5);
    assert_eq!(pcr16(&mut fe), extended, "the same guest keeps its PCRs");
    fe.close().expect("close");
    // The guest is destroyed; a new one (domain 6) gets the same vTPM.
    assert!(toolstack::remove_vtpm(&xs, 5, 0, 0, Duration::from_secs(10)).expect("remove"));
    toolstack::remove_domain(&xs, 5).expect("remove domain");
    let mut fe = guest(&host, &xs, 6);
    assert_eq!(pcr16(&mut fe), [0u8; 32], "a new guest found the old guest's PCRs");
    fe.close().expect("close");
    assert!(vtpm.log().contains("a new guest"), "{}", vtpm.log());
}

/// `vtpm create` of a TPM 1.2 next to [`create`]'s (its own state directory and key).
fn create_tpm12(host: &SimHost) -> (PathBuf, PathBuf) {
    let state = host.dir().join("state12");
    let key = host.dir().join("key12");
    std::fs::write(&key, [0x12; 32]).expect("key");
    let created = Command::new(VTPM)
        .args(["create", "--tpm1.2", "--state-dir"])
        .arg(&state)
        .arg("--key")
        .arg(&key)
        .output()
        .expect("create");
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    (state, key)
}

/// The snapshot slot files in a simulation's `snapshots` directory.
fn snapshot_files(sim: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(sim.join("snapshots"))
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "snapshot")).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// A planned stop: SIGTERM, and the process exits by itself.
fn terminate(mut p: Proc) -> String {
    let pid = p.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    let end = Instant::now() + Duration::from_secs(20);
    while p.0.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < end, "vtpm ignored SIGTERM:\n{}", p.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    p.log()
}

/// A guest (domain `domid`) connected to a new device of the vTPM `UUID`.
fn guest(host: &SimHost, xs: &xvtpm_xen::Xenstore, domid: u16) -> Frontend {
    toolstack::add_domain(xs, domid, "guest").expect("domain");
    toolstack::add_vtpm(xs, domid, 0, 0, UUID).expect("vtpm device");
    reconnect(host, domid)
}

/// The guest of domain `domid` connects its frontend (again).
fn reconnect(host: &SimHost, domid: u16) -> Frontend {
    Frontend::connect(&host.xen(domid), cfg()).expect("guest connects")
}

/// A guest's frontend: commands may wait for a restarting vtpm.
fn cfg() -> FrontendConfig {
    FrontendConfig { command_timeout: Duration::from_secs(30), ..FrontendConfig::default() }
}

/// The guest's domain is destroyed (device and domain removed, as `xl destroy` does); with
/// `backend_up`, the vtpm closes its end in time.
fn destroy(xs: &xvtpm_xen::Xenstore, domid: u16, backend_up: bool) {
    let wait = if backend_up { Duration::from_secs(10) } else { Duration::from_millis(100) };
    assert_eq!(toolstack::remove_vtpm(xs, domid, 0, 0, wait).expect("remove"), backend_up);
    toolstack::remove_domain(xs, domid).expect("remove domain");
}

/// The guest's next domain `domid` (restored, migrated or rebooted: the same `vm` path `vm`)
/// with the same vtpm device, connected.
fn next_domain(host: &SimHost, xs: &xvtpm_xen::Xenstore, domid: u16, vm: &str) -> Frontend {
    toolstack::add_domain_of(xs, domid, "guest", vm).expect("domain");
    toolstack::add_vtpm(xs, domid, 0, 0, UUID).expect("vtpm device");
    reconnect(host, domid)
}

/// PCR 16 extended and a key loaded: (PCR 16, the key's handle, its ReadPublic answer).
fn measure_and_load(fe: &mut Frontend) -> (Vec<u8>, u32, Vec<u8>) {
    let r = fe.transmit(&xvtpm_tests::tpm2::pcr_extend_sha256(16, &[0x16; 32])).expect("extend");
    assert_eq!(rc(&r), 0, "PCR_Extend");
    let r = fe.transmit(&xvtpm_tests::tpm2::create_primary_ecc_p256()).expect("create primary");
    assert_eq!(rc(&r), 0, "CreatePrimary");
    let handle = xvtpm_tests::tpm2::created_handle(&r).expect("handle");
    let public = fe.transmit(&xvtpm_tests::tpm2::read_public(handle)).expect("read public");
    assert_eq!(rc(&public), 0, "ReadPublic");
    (pcr16(fe), handle, public)
}

/// A vtpm that stops under a running guest, by SIGTERM or by kill -9, resumes the guest's TPM
/// when it starts again: the PCRs are as they were and a key loaded before is still loaded.
/// The guest stays connected throughout, as a running Linux guest does.
#[test]
fn a_restarted_vtpm_resumes_the_running_guests_tpm() {
    let host = SimHost::temp().expect("sim");
    let xs = host.xen(0).xenstore().expect("xs");
    let (state, key) = create(&host, 0x45);
    let vtpm = serve(host.dir(), &state, &key, 1);
    wait_for(&vtpm, "watching");
    let mut fe = guest(&host, &xs, 5);
    let (pcr, handle, public) = measure_and_load(&mut fe);
    assert_ne!(pcr, [0u8; 32]);

    let log = terminate(vtpm);
    assert!(log.contains("kept in snapshot"), "{log}");
    let vtpm = serve(host.dir(), &state, &key, 2);
    wait_for(&vtpm, "resumed from snapshot");
    assert_eq!(pcr16(&mut fe), pcr, "PCR 16 after SIGTERM and a restart");
    assert_eq!(fe.transmit(&xvtpm_tests::tpm2::read_public(handle)).expect("read public"), public);

    let r = fe.transmit(&xvtpm_tests::tpm2::pcr_extend_sha256(16, &[0x17; 32])).expect("extend");
    assert_eq!(rc(&r), 0);
    let pcr = pcr16(&mut fe);
    drop(vtpm); // kill -9
    let vtpm = serve(host.dir(), &state, &key, 3);
    wait_for(&vtpm, "resumed from snapshot");
    assert_eq!(pcr16(&mut fe), pcr, "PCR 16 after kill -9 and a restart");
    assert_eq!(fe.transmit(&xvtpm_tests::tpm2::read_public(handle)).expect("read public"), public);
    assert!(!vtpm.log().contains("starts reset"), "{}", vtpm.log());

    // The guest reboots (a new domain): its TPM starts reset, as a platform reset would.
    fe.close().expect("close");
    destroy(&xs, 5, true);
    let mut fe = guest(&host, &xs, 6);
    assert_eq!(pcr16(&mut fe), [0u8; 32], "the rebooted guest found its old PCRs");
    let r = fe.transmit(&xvtpm_tests::tpm2::read_public(handle)).expect("read public");
    assert_ne!(rc(&r), 0, "the rebooted guest found the old guest's loaded key");
}

/// Where the running guest's TPM cannot be resumed, the restarted vtpm refuses that guest
/// (TPM_RC_FAILURE, and a log line naming it and why) instead of handing it reset PCRs: no
/// snapshot, a tampered one, or one made for another vTPM's guest. The guest's next life gets
/// a working TPM with reset PCRs; an operator may accept a reset of the running guest.
#[test]
fn a_running_guest_whose_tpm_cannot_be_resumed_is_refused_until_it_reboots() {
    let host = SimHost::temp().expect("sim");
    let xs = host.xen(0).xenstore().expect("xs");
    let (state, key) = create(&host, 0x46);
    let vtpm = serve(host.dir(), &state, &key, 1);
    wait_for(&vtpm, "watching");
    let mut fe = guest(&host, &xs, 5);
    measure_and_load(&mut fe);
    let snaps = snapshot_files(host.dir());
    assert_eq!(snaps.len(), 2, "two slots: {snaps:?}");
    drop(vtpm);

    let refused = |fe: &mut Frontend, vtpm: &Proc, what: &str| {
        let r = fe.transmit(&xvtpm_tests::tpm2::pcr_read_sha256(16)).expect("PCR_Read");
        assert_eq!(rc(&r), 0x101, "{what}: TPM_RC_FAILURE expected, got {r:02x?}\n{}", vtpm.log());
        assert!(vtpm.log().contains("cannot be resumed"), "{what}: {}", vtpm.log());
        assert!(vtpm.log().contains("vtpm 5/0"), "{what}: the log names the guest: {}", vtpm.log());
    };
    // Tampered snapshots (both slots).
    for snap in &snaps {
        let mut bad = std::fs::read(snap).expect("snapshot");
        let last = bad.len() - 1;
        bad[last] ^= 1;
        std::fs::write(snap, &bad).expect("tamper");
    }
    let vtpm = serve(host.dir(), &state, &key, 2);
    wait_for(&vtpm, "guest connected");
    refused(&mut fe, &vtpm, "a tampered snapshot");
    assert!(vtpm.log().contains("does not authenticate"), "{}", vtpm.log());
    drop(vtpm);

    // Another vTPM's snapshot of its own guest put in this one's place.
    let other_host = SimHost::temp().expect("sim");
    let other_xs = other_host.xen(0).xenstore().expect("xs");
    let (other_state, other_key) = create(&other_host, 0x47);
    let other = serve(other_host.dir(), &other_state, &other_key, 1);
    wait_for(&other, "watching");
    let mut other_fe = guest(&other_host, &other_xs, 5);
    measure_and_load(&mut other_fe);
    for (theirs, ours) in snapshot_files(other_host.dir()).iter().zip(&snaps) {
        std::fs::copy(theirs, ours).expect("copy");
    }
    let vtpm = serve(host.dir(), &state, &key, 3);
    wait_for(&vtpm, "guest connected");
    refused(&mut fe, &vtpm, "another vTPM's snapshot");
    drop(vtpm);

    // No snapshot at all.
    for snap in &snaps {
        std::fs::remove_file(snap).expect("remove");
    }
    let vtpm = serve(host.dir(), &state, &key, 4);
    wait_for(&vtpm, "guest connected");
    refused(&mut fe, &vtpm, "no snapshot");
    refused(&mut fe, &vtpm, "still");
    // The guest reboots: its next life gets a working TPM, PCRs reset.
    fe.close().expect("close");
    destroy(&xs, 5, true);
    let mut fe = guest(&host, &xs, 6);
    assert_eq!(pcr16(&mut fe), [0u8; 32]);
    let (pcr6, _, _) = measure_and_load(&mut fe);
    assert_ne!(pcr6, [0u8; 32]);
    drop(vtpm);

    // The operator accepts a reset of the running guest (domain 6), whose snapshot is gone.
    for f in snapshot_files(host.dir()) {
        std::fs::remove_file(f).expect("remove");
    }
    let vtpm = serve_with(host.dir(), &state, &key, 5, &["--reset-running-guest", "6"]);
    wait_for(&vtpm, "the operator accepted a reset");
    assert_eq!(pcr16(&mut fe), [0u8; 32]);
}

/// A snapshot is bound to one life of the guest's domain: a domain destroyed while the vtpm
/// was down and made again with the same id is a new guest, whose TPM starts reset.
#[test]
fn a_snapshot_of_an_earlier_life_of_the_same_domain_id_is_not_resumed() {
    let host = SimHost::temp().expect("sim");
    let xs = host.xen(0).xenstore().expect("xs");
    let (state, key) = create(&host, 0x48);
    let vtpm = serve(host.dir(), &state, &key, 1);
    wait_for(&vtpm, "watching");
    let mut fe = guest(&host, &xs, 5);
    measure_and_load(&mut fe);
    drop(vtpm);
    fe.close().expect("close");
    destroy(&xs, 5, false);
    let vtpm = serve(host.dir(), &state, &key, 2);
    wait_for(&vtpm, "watching");
    let mut fe = guest(&host, &xs, 5);
    assert_eq!(pcr16(&mut fe), [0u8; 32], "an earlier life's PCRs");
    let log = vtpm.log();
    assert!(log.contains("starts reset") && log.contains("belongs to domain 5"), "{log}");
}

/// TPM_Extend / TPM_PCRRead of PCR 16 for a TPM 1.2 (the response's digest).
fn tpm12_pcr16(fe: &mut Frontend, extend: Option<[u8; 20]>) -> Vec<u8> {
    let cmd = match extend {
        Some(d) => [&[0x00, 0xC1, 0, 0, 0, 34, 0, 0, 0, 0x14, 0, 0, 0, 16][..], &d].concat(),
        None => vec![0x00, 0xC1, 0, 0, 0, 14, 0, 0, 0, 0x15, 0, 0, 0, 16],
    };
    let r = fe.transmit(&cmd).expect("TPM 1.2 command");
    assert_eq!((rc(&r), r.len()), (0, 30), "{r:02x?}");
    r[10..].to_vec()
}

/// A TPM 1.2 vTPM resumes too.
#[test]
fn a_tpm12_vtpm_resumes_the_running_guests_pcrs() {
    let host = SimHost::temp().expect("sim");
    let xs = host.xen(0).xenstore().expect("xs");
    let (state, key) = create_tpm12(&host);
    let vtpm = serve_with(host.dir(), &state, &key, 1, &["--tpm1.2"]);
    wait_for(&vtpm, "watching");
    let mut fe = guest(&host, &xs, 5);
    assert_eq!(tpm12_pcr16(&mut fe, None), [0u8; 20]);
    let pcr = tpm12_pcr16(&mut fe, Some([0x16; 20]));
    drop(vtpm);
    let vtpm = serve_with(host.dir(), &state, &key, 2, &["--tpm1.2"]);
    wait_for(&vtpm, "resumed from snapshot");
    assert_eq!(tpm12_pcr16(&mut fe, None), pcr);
}

/// `xl save` + `xl restore`, as libxl does them: "suspend" in the guest's control/shutdown,
/// the guest's suspend (the hypervisor records its shutdown for a suspend), the domain
/// destroyed, a new domain (new id, new start_time, the same `vm` path) with the same vtpm
/// device. The restored guest finds its TPM as it was at the save, whether or not
/// the vtpm was restarted in between. A second restore of the same save is a new platform to
/// the vTPM, as a reboot is; so is a later domain that was not suspended.
#[test]
fn a_saved_and_restored_guest_finds_its_tpm_as_it_was() {
    let host = SimHost::temp().expect("sim");
    let xs = host.xen(0).xenstore().expect("xs");
    let (state, key) = create(&host, 0x49);
    let vtpm = serve(host.dir(), &state, &key, 1);
    wait_for(&vtpm, "watching");
    let mut fe = guest(&host, &xs, 5);
    let (pcr, handle, public) = measure_and_load(&mut fe);
    let vm = toolstack::vm_path(5);
    let restore = |domid: u16| -> Frontend { next_domain(&host, &xs, domid, &vm) };
    let save = |domid: u16, vtpm: &Proc| {
        toolstack::request_suspend(&xs, domid).expect("suspend");
        host.shut_down(domid, ShutdownReason::Suspend).expect("the guest suspends");
        wait_for(vtpm, "for its next domain");
        assert!(toolstack::remove_vtpm(&xs, domid, 0, 0, Duration::from_secs(10)).expect("remove"));
        // Not remove_domain: it would take the vm record the restored domain keeps.
        xs.rm(TxId::NONE, &format!("/local/domain/{domid}")).expect("rm");
    };
    // libxl asks; the guest still runs a command before its processes freeze; it suspends
    // (at once: a guest may clear the request before the vtpm could read it); it is saved.
    toolstack::request_suspend(&xs, 5).expect("suspend");
    let r = fe.transmit(&xvtpm_tests::tpm2::pcr_extend_sha256(16, &[0x19; 32])).expect("extend");
    assert_eq!(rc(&r), 0);
    let late = pcr16(&mut fe);
    assert_ne!(late, pcr);
    xs.write(TxId::NONE, "/local/domain/5/control/shutdown", b"").expect("the guest acknowledges");
    host.shut_down(5, ShutdownReason::Suspend).expect("the guest suspends");
    wait_for(&vtpm, "for its next domain");
    assert!(toolstack::remove_vtpm(&xs, 5, 0, 0, Duration::from_secs(10)).expect("remove"));
    xs.rm(TxId::NONE, "/local/domain/5").expect("rm");
    drop(fe);
    let mut fe = restore(6);
    assert_eq!(pcr16(&mut fe), late, "PCR 16 after save and restore, with the command sent after the request");
    assert_eq!(fe.transmit(&xvtpm_tests::tpm2::read_public(handle)).expect("read public"), public);
    wait_for(&vtpm, "continues domain 5");

    // Saved again; the vtpm restarts while the guest is on disk; restored.
    let r = fe.transmit(&xvtpm_tests::tpm2::pcr_extend_sha256(16, &[0x18; 32])).expect("extend");
    assert_eq!(rc(&r), 0);
    let pcr = pcr16(&mut fe);
    save(6, &vtpm);
    drop(fe);
    // A planned stop (SIGTERM: xvtpmd stops a vtpm whose device went, an upgrade): the
    // suspend mark stays in the snapshot it writes.
    let log = terminate(vtpm);
    assert!(log.contains("is kept in snapshot"), "{log}");
    let vtpm = serve(host.dir(), &state, &key, 2);
    wait_for(&vtpm, "watching");
    let mut fe = restore(7);
    assert_eq!(pcr16(&mut fe), pcr, "PCR 16 after save, a vtpm restart and restore");
    assert_eq!(fe.transmit(&xvtpm_tests::tpm2::read_public(handle)).expect("read public"), public);
    wait_for(&vtpm, "resumed from snapshot");

    // The same save restored a second time (domain 7 gone without a suspend): a new platform.
    drop(fe);
    assert!(toolstack::remove_vtpm(&xs, 7, 0, 0, Duration::from_secs(10)).expect("remove"));
    xs.rm(TxId::NONE, "/local/domain/7").expect("rm");
    let mut fe = restore(8);
    assert_eq!(pcr16(&mut fe), [0u8; 32], "a second restore found the first one's TPM");
}

/// A vtpm started before its state is there (`--incoming`, the destination of a live
/// migration) serves the device at once; a guest that connects before the state arrives is
/// refused with the TPM's failure response and a log line; once the state is there, the next
/// connection opens it. Its guest is a running one (it arrives with its TPM in use): with no
/// snapshot to continue, it is refused, never handed a reset TPM.
#[test]
fn an_incoming_vtpm_opens_its_state_when_the_guest_connects() {
    let host = SimHost::temp().expect("sim");
    let xs = host.xen(0).xenstore().expect("xs");
    let (made, key) = create(&host, 0x4a);
    let state = host.dir().join("incoming");
    let vtpm = serve_with(host.dir(), &state, &key, 1, &["--incoming"]);
    wait_for(&vtpm, "watching");
    assert!(vtpm.log().contains("incoming into"), "{}", vtpm.log());
    let mut fe = guest(&host, &xs, 5);
    let r = fe.transmit(&xvtpm_tests::tpm2::pcr_read_sha256(16)).expect("PCR_Read");
    assert_eq!(rc(&r), 0x101, "no state yet: TPM_RC_FAILURE");
    assert!(vtpm.log().contains("cannot be opened yet"), "{}", vtpm.log());
    fe.close().expect("close");
    for f in std::fs::read_dir(&made).expect("state").flatten() {
        std::fs::copy(f.path(), state.join(f.file_name())).expect("copy");
    }
    let mut fe = reconnect(&host, 5);
    let r = fe.transmit(&xvtpm_tests::tpm2::pcr_read_sha256(16)).expect("PCR_Read");
    assert_eq!(rc(&r), 0x101, "an arriving guest without its snapshot: TPM_RC_FAILURE, not reset PCRs");
    assert!(vtpm.log().contains("the vTPM's state is opened"), "{}", vtpm.log());
    assert!(vtpm.log().contains("cannot be resumed"), "{}", vtpm.log());
}

/// The attack of a guest's root on its own boot measurements: it writes "suspend" in its
/// `control/shutdown` (its own node), then reboots at once without closing its TPM device
/// (sysrq-b, or a crash with `on_crash = "restart"`), hoping that its next boot, in a domain
/// with the same `vm` path, inherits the PCRs of this one. The hypervisor says the domain
/// shut down for a reboot, not a suspend: the next boot gets a reset TPM.
#[test]
fn a_guest_that_writes_suspend_itself_and_reboots_gets_a_reset_tpm() {
    let host = SimHost::temp().expect("sim");
    let xs = host.xen(0).xenstore().expect("xs");
    let (state, key) = create(&host, 0x4b);
    let vtpm = serve(host.dir(), &state, &key, 1);
    wait_for(&vtpm, "watching");
    let mut fe = guest(&host, &xs, 5);
    measure_and_load(&mut fe);
    // The node is the guest's to write (it acknowledges requests there); the vtpm cannot
    // tell who wrote it, so dom0 writes it here for the guest.
    toolstack::request_suspend(&xs, 5).expect("suspend");
    assert_eq!(rc(&fe.transmit(&xvtpm_tests::tpm2::get_random(8)).expect("command")), 0, "it goes on");
    host.shut_down(5, ShutdownReason::Reboot).expect("the guest reboots");
    wait_for(&vtpm, "shut down (reboot)");
    destroy(&xs, 5, true);
    let mut fe = next_domain(&host, &xs, 6, &toolstack::vm_path(5));
    assert_eq!(pcr16(&mut fe), [0u8; 32], "the rebooted guest kept its PCRs");
    assert!(!vtpm.log().contains("is being suspended"), "{}", vtpm.log());
}

/// `xl save -c` (a checkpoint): the guest suspends and is resumed in place. Its next command
/// shows it runs again: if it later reboots (even without closing its TPM device), its next
/// domain gets a reset TPM; if it is saved again, its restored domain continues the TPM.
#[test]
fn a_checkpointed_guest_goes_on_and_its_next_boot_is_reset() {
    let host = SimHost::temp().expect("sim");
    let xs = host.xen(0).xenstore().expect("xs");
    let (state, key) = create(&host, 0x4c);
    let vtpm = serve(host.dir(), &state, &key, 1);
    wait_for(&vtpm, "watching");
    let mut fe = guest(&host, &xs, 5);
    let (pcr, _, _) = measure_and_load(&mut fe);
    let vm = toolstack::vm_path(5);
    host.shut_down(5, ShutdownReason::Suspend).expect("the guest suspends");
    wait_for(&vtpm, "for its next domain");
    host.resume_domain(5).expect("resumed in place");
    assert_eq!(pcr16(&mut fe), pcr, "the checkpointed guest's PCRs");
    wait_for(&vtpm, "runs again after its suspend");

    // Suspended again and restored: the restored domain continues.
    host.shut_down(5, ShutdownReason::Suspend).expect("the guest suspends again");
    wait_for_nth(&vtpm, "for its next domain", 2);
    // A suspended guest never closes its device: it is removed under it.
    assert!(toolstack::remove_vtpm(&xs, 5, 0, 0, Duration::from_secs(10)).expect("remove"));
    drop(fe);
    xs.rm(TxId::NONE, "/local/domain/5").expect("rm");
    let mut fe = next_domain(&host, &xs, 6, &vm);
    assert_eq!(pcr16(&mut fe), pcr, "the restored guest's PCRs");

    // Checkpointed, resumed, then it reboots without closing its device: a new platform.
    host.shut_down(6, ShutdownReason::Suspend).expect("the guest suspends");
    wait_for_nth(&vtpm, "for its next domain", 3);
    host.resume_domain(6).expect("resumed in place");
    // No command in between: the reboot itself ends the suspend.
    host.shut_down(6, ShutdownReason::Reboot).expect("the guest reboots");
    wait_for(&vtpm, "shut down (reboot) after a suspend: no longer suspended");
    destroy(&xs, 6, true);
    drop(fe);
    let mut fe = next_domain(&host, &xs, 7, &vm);
    assert_eq!(pcr16(&mut fe), [0u8; 32], "the rebooted guest kept its PCRs");
}

/// After a checkpoint, before its next command, a guest's root lets go of its TPM device
/// without closing it (it writes its frontend's state back to Initialising) and reboots at
/// once: the vtpm must not take it for a suspended guest; its next boot gets a reset TPM.
#[test]
fn a_checkpointed_guest_that_drops_its_device_and_reboots_gets_a_reset_tpm() {
    let host = SimHost::temp().expect("sim");
    let xs = host.xen(0).xenstore().expect("xs");
    let (state, key) = create(&host, 0x4d);
    let vtpm = serve(host.dir(), &state, &key, 1);
    wait_for(&vtpm, "watching");
    let fe = {
        let mut fe = guest(&host, &xs, 5);
        measure_and_load(&mut fe);
        fe
    };
    host.shut_down(5, ShutdownReason::Suspend).expect("the guest suspends");
    wait_for(&vtpm, "for its next domain");
    host.resume_domain(5).expect("resumed in place");
    let guest_xs = host.xen(5).xenstore().expect("the guest's xenstore");
    guest_xs.write(TxId::NONE, "device/vtpm/0/state", b"1").expect("the guest's root writes its state");
    wait_for(&vtpm, "vtpm 5/0: disconnected");
    host.shut_down(5, ShutdownReason::Reboot).expect("the guest reboots");
    wait_for(&vtpm, "domain 5 shut down (reboot)");
    destroy(&xs, 5, true);
    let mut next = next_domain(&host, &xs, 6, &toolstack::vm_path(5));
    assert_eq!(pcr16(&mut next), [0u8; 32], "the rebooted guest kept its PCRs");
    // Held until here: its drop closes the old device, which would end the mark anyway.
    drop(fe);
}

#[test]
fn an_idle_vtpm_never_wakes() {
    let host = SimHost::temp().expect("sim");
    let xs = host.xen(0).xenstore().expect("xs");
    let (state, key) = create(&host, 0x4a);
    let vtpm = serve(host.dir(), &state, &key, 1);
    wait_for(&vtpm, "watching");
    let getrandom = xvtpm_tests::tpm2::get_random(16);
    let mut fe = guest(&host, &xs, 5);
    assert_eq!(rc(&fe.transmit(&getrandom).expect("getrandom")), 0);
    // Settled: the connection is up, the command answered and its snapshot written.
    std::thread::sleep(Duration::from_millis(500));
    let pid = vtpm.0.id();
    let (before, threads_before) = xvtpm_tests::procstat::wakeups(pid);
    std::thread::sleep(Duration::from_secs(5));
    let (after, threads_after) = xvtpm_tests::procstat::wakeups(pid);
    assert_eq!(
        after - before,
        0,
        "an idle vtpm serving a connected guest woke up; per thread before {threads_before:?}, after {threads_after:?}"
    );
    // Idle is not dead: the next command and a stop are served at once.
    assert_eq!(rc(&fe.transmit(&getrandom).expect("getrandom after idling")), 0);
    let t = Instant::now();
    let log = terminate(vtpm);
    assert!(t.elapsed() < Duration::from_secs(2), "SIGTERM took {:?}; {log}", t.elapsed());
}
