//! What a manager killed in the middle of an operation leaves in a TPM it talks to directly
//! (TIS in its stub domain, swtpm here; not /dev/tpmrm0, which flushes behind each client):
//! sessions and loaded objects or keys, held until flushed. Here the TPM is filled with them
//! the way many killed managers would fill it; the manager's next operations still work,
//! because it flushes what it did not make when the TPM is full.

mod common;

use xvtpm_tis::{Family, HwTpm};
use xvtpm_vtpmmgr::hw::tpm12::Tpm12;
use xvtpm_vtpmmgr::hw::tpm2::Tpm2;

fn rc(r: &[u8]) -> u32 {
    u32::from_be_bytes(r[6..10].try_into().expect("response header"))
}

/// Sends `cmd` until the TPM refuses it; the code it refused with.
fn fill(hw: &mut dyn HwTpm, cmd: &[u8]) -> u32 {
    for _ in 0..1000 {
        let r = hw.transmit(0, cmd).expect("transmit");
        if rc(&r) != 0 {
            return rc(&r);
        }
    }
    panic!("the TPM took 1000 of them");
}

/// TPM2_StartAuthSession of an unbound, unsalted policy session.
fn start_policy_session() -> Vec<u8> {
    let mut c = vec![0x80, 0x01, 0, 0, 0, 0, 0, 0, 0x01, 0x76];
    c.extend_from_slice(&0x4000_0007u32.to_be_bytes());
    c.extend_from_slice(&0x4000_0007u32.to_be_bytes());
    c.extend_from_slice(&[0, 16]);
    c.extend_from_slice(&[0x5A; 16]);
    c.extend_from_slice(&[0, 0, 0x01, 0x00, 0x10, 0x00, 0x0B]);
    let n = c.len() as u32;
    c[2..6].copy_from_slice(&n.to_be_bytes());
    c
}

#[test]
fn tpm12_leftover_sessions_and_keys_do_not_lock_the_manager_out() {
    let dir = common::tmpdir("leftovers-1.2");
    let sw = common::HwSwtpm::start_family(&dir, Family::Tpm12);
    let mut hw = sw.connect();
    let (owner, srk, ctr_auth) = ([1u8; 20], [0u8; 20], [4u8; 20]);
    let mut t = Tpm12::new(hw.as_mut(), 0);
    t.startup().expect("startup");
    t.take_ownership(&owner, &srk).expect("take ownership");
    let (id, v0) = t.counter_create(&owner, &ctr_auth).expect("counter");

    let oiap = [0x00, 0xC1, 0, 0, 0, 10, 0, 0, 0, 0x0A];
    assert_eq!(fill(hw.as_mut(), &oiap), 0x15, "TPM_RESOURCES once the sessions are used up");
    let mut t = Tpm12::new(hw.as_mut(), 0);
    assert_eq!(t.counter_increment(id, &ctr_auth).expect("increment with the session slots full"), v0 + 1);

    // Each operation a manager that dies before flushing its key.
    let key_auth = [5u8; 20];
    let wrapped = t.create_signing_key(&srk, &key_auth).expect("signing key");
    for i in 0..64 {
        Tpm12::new(hw.as_mut(), 0).load_key(&srk, &wrapped).unwrap_or_else(|e| panic!("load {i}: {e}"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tpm2_leftover_sessions_and_objects_do_not_lock_the_manager_out() {
    let dir = common::tmpdir("leftovers-2.0");
    let sw = common::HwSwtpm::start_family(&dir, Family::Tpm20);
    let mut hw = sw.connect();
    Tpm2::new(hw.as_mut(), 0).startup().expect("startup");

    let start_session = start_policy_session();
    assert_eq!(fill(hw.as_mut(), &start_session), 0x903, "TPM_RC_SESSION_MEMORY once the sessions are used up");
    let policy = Tpm2::new(hw.as_mut(), 0).pcr_policy(&[0, 16]).expect("a policy with the session slots full");
    assert_eq!(policy.len(), 32);

    assert_eq!(
        fill(hw.as_mut(), &xvtpm_tests::tpm2::create_primary_ecc_p256()),
        0x902,
        "TPM_RC_OBJECT_MEMORY once the object slots are used up"
    );
    let mut t = Tpm2::new(hw.as_mut(), 0);
    let (private, public, creation) = t.seal(&[0x42; 32], &[0, 16]).expect("seal with the object slots full");
    fill(hw.as_mut(), &start_session);
    fill(hw.as_mut(), &xvtpm_tests::tpm2::create_primary_ecc_p256());
    let mut t = Tpm2::new(hw.as_mut(), 0);
    assert_eq!(t.unseal(&private, &public, &creation, &[0, 16]).expect("unseal with all slots full"), [0x42; 32]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TPM reached through the kernel's device, which other processes share.
struct Shared(Box<dyn HwTpm + Send>);

impl HwTpm for Shared {
    fn transmit(&mut self, locality: u8, command: &[u8]) -> xvtpm_tis::Result<Vec<u8>> {
        self.0.transmit(locality, command)
    }
    fn family(&self) -> Family {
        self.0.family()
    }
    fn describe(&self) -> String {
        "shared".into()
    }
    fn owns_tpm(&self) -> bool {
        false
    }
}

/// On a TPM the manager shares (the kernel's /dev/tpm0 or /dev/tpmrm0), the sessions it did
/// not make belong to other processes: a full TPM is an error, and nothing is flushed.
#[test]
fn a_shared_tpm_full_of_other_sessions_is_left_alone() {
    let dir = common::tmpdir("leftovers-shared");
    let sw = common::HwSwtpm::start_family(&dir, Family::Tpm20);
    let mut hw = Shared(sw.connect());
    Tpm2::new(&mut hw, 0).startup().expect("startup");
    let start_session = start_policy_session();
    assert_eq!(fill(&mut hw, &start_session), 0x903);
    let e = Tpm2::new(&mut hw, 0).pcr_policy(&[0, 16]).expect_err("the TPM is full");
    assert!(matches!(e, xvtpm_vtpmmgr::Error::TpmRc { rc: 0x903, .. }), "{e}");
    assert_eq!(fill(&mut hw, &start_session), 0x903, "still full: nothing was flushed");
    let _ = std::fs::remove_dir_all(&dir);
}
