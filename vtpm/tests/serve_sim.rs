//! `vtpm serve` as a Xen backend process on the simulated Xen, a user-space tpmfront as the
//! guest: real TPM 2.0 commands through the shared page, state kept across vtpm restarts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use xvtpm_frontend::{Frontend, FrontendConfig};
use xvtpm_xen::sim::{toolstack, SimHost};
use xvtpm_xen::{TxId, Xen, XenbusState};

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
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if p.log().contains(needle) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("vtpm never logged {needle:?}:\n{}", p.log());
}

#[test]
fn guest_uses_the_vtpm_and_state_survives_restarts() {
    let host = SimHost::temp().expect("sim");
    let xs = host.xen(0).xenstore().expect("xs");
    let (state, key) = create(&host, 0x42);

    let vtpm = serve(host.dir(), &state, &key, 1);
    wait_for(&vtpm, "watching");
    toolstack::add_domain(&xs, 5, "guest").expect("domain");
    toolstack::add_vtpm(&xs, 5, 0, 0, UUID).expect("vtpm device");
    let cfg = FrontendConfig { command_timeout: Duration::from_secs(30), ..FrontendConfig::default() };
    let mut fe = Frontend::connect(&host.xen(5), cfg.clone()).expect("guest connects");
    // The vTPM is started (TPM2_Startup was sent by vtpm serve): GetRandom works at once.
    let r = fe.transmit(&[0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 0x10]).expect("getrandom");
    assert_eq!((rc(&r), r.len()), (0, 28), "{r:02x?}");
    assert_eq!(rc(&fe.transmit(&xvtpm_tests::tpm2::change_owner_auth(b"", b"guest-secret")).expect("cmd")), 0);
    fe.close().expect("close");
    drop(vtpm);

    // A new vtpm process, same state: the owner password is still set.
    let vtpm = serve(host.dir(), &state, &key, 2);
    wait_for(&vtpm, "watching");
    let mut fe = Frontend::connect(&host.xen(5), cfg).expect("guest reconnects");
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
    let cfg = FrontendConfig { command_timeout: Duration::from_secs(30), ..FrontendConfig::default() };
    let getrandom = [0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 0x10];

    let vtpm = serve(host.dir(), &state, &key, 1);
    wait_for(&vtpm, "watching");
    let mut fe = Frontend::connect(&host.xen(5), cfg.clone()).expect("guest connects");
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
    let mut fe = Frontend::connect(&host.xen(5), cfg).expect("guest reconnects");
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
    toolstack::add_domain(&xs, 5, "guest").expect("domain");
    toolstack::add_vtpm(&xs, 5, 0, 0, UUID).expect("vtpm device");
    let cfg = FrontendConfig { command_timeout: Duration::from_secs(30), ..FrontendConfig::default() };
    let mut fe = Frontend::connect(&host.xen(5), cfg.clone()).expect("guest connects");
    assert_eq!(pcr16(&mut fe), [0u8; 32]);
    let r = fe.transmit(&xvtpm_tests::tpm2::pcr_extend_sha256(16, &[0x16; 32])).expect("extend");
    assert_eq!(rc(&r), 0, "PCR_Extend");
    let extended = pcr16(&mut fe);
    assert_ne!(extended, [0u8; 32]);
    fe.close().expect("close");
    let mut fe = Frontend::connect(&host.xen(5), cfg.clone()).expect("the same guest reconnects");
    assert_eq!(pcr16(&mut fe), extended, "the same guest keeps its PCRs");
    fe.close().expect("close");
    // The guest is destroyed; a new one (domain 6) gets the same vTPM.
    assert!(toolstack::remove_vtpm(&xs, 5, 0, 0, Duration::from_secs(10)).expect("remove"));
    toolstack::remove_domain(&xs, 5).expect("remove domain");
    toolstack::add_domain(&xs, 6, "guest").expect("domain");
    toolstack::add_vtpm(&xs, 6, 0, 0, UUID).expect("vtpm device");
    let mut fe = Frontend::connect(&host.xen(6), cfg).expect("the new guest connects");
    assert_eq!(pcr16(&mut fe), [0u8; 32], "a new guest found the old guest's PCRs");
    fe.close().expect("close");
    assert!(vtpm.log().contains("a new guest"), "{}", vtpm.log());
}
