//! The libtpms engine, TPM 2.0 and 1.2, with raw commands. libtpms holds one TPM per process,
//! so these tests take turns.

use std::sync::{Arc, Mutex};

use xvtpm_vtpm::libtpms::{Libtpms, LibtpmsConfig};
use xvtpm_vtpm::state::{MemStore, StateStore};
use xvtpm_vtpm::{Error, StateKind, TpmEngine, TpmVersion};

static TURN: Mutex<()> = Mutex::new(());

/// A store the test keeps a handle to across engine restarts.
#[derive(Debug, Clone, Default)]
struct Shared(Arc<Mutex<MemStore>>);

impl StateStore for Shared {
    fn load(&mut self, name: &str) -> xvtpm_vtpm::Result<Option<Vec<u8>>> {
        self.0.lock().expect("lock").load(name)
    }
    fn store(&mut self, name: &str, data: &[u8]) -> xvtpm_vtpm::Result<()> {
        self.0.lock().expect("lock").store(name, data)
    }
    fn delete(&mut self, name: &str) -> xvtpm_vtpm::Result<()> {
        self.0.lock().expect("lock").delete(name)
    }
}

fn engine(version: TpmVersion, store: &Shared, create: bool) -> xvtpm_vtpm::Result<Libtpms> {
    Libtpms::new(LibtpmsConfig { version, store: Box::new(store.clone()), create, label: "test store".into() })
}

fn rc(rsp: &[u8]) -> u32 {
    u32::from_be_bytes([rsp[6], rsp[7], rsp[8], rsp[9]])
}

const TPM2_STARTUP_CLEAR: [u8; 12] = [0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x44, 0, 0];
const TPM2_GETRANDOM_16: [u8; 12] = [0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 0x10];

#[test]
fn tpm2_commands_and_persistence_across_restarts() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let store = Shared::default();
    {
        let mut tpm = engine(TpmVersion::V2_0, &store, true).expect("engine");
        assert!(matches!(engine(TpmVersion::V2_0, &store, true), Err(Error::AlreadyInUse)), "one TPM per process");
        assert!(tpm.process(0, &TPM2_STARTUP_CLEAR).is_err(), "no commands before power on");
        tpm.init(false).expect("init");
        assert_eq!(rc(&tpm.process(0, &TPM2_STARTUP_CLEAR).expect("startup")), 0);
        let r1 = tpm.process(0, &TPM2_GETRANDOM_16).expect("getrandom");
        let r2 = tpm.process(0, &TPM2_GETRANDOM_16).expect("getrandom");
        assert_eq!((rc(&r1), r1.len()), (0, 10 + 2 + 16));
        assert_ne!(r1[12..], r2[12..], "random bytes differ");
        assert_eq!(rc(&tpm.process(0, &xvtpm_tests::tpm2::change_owner_auth(b"", b"s3cret")).expect("change auth")), 0);
        assert_ne!(
            rc(&tpm.process(0, &xvtpm_tests::tpm2::change_owner_auth(b"", b"x")).expect("wrong auth")),
            0,
            "old password refused"
        );
        tpm.shutdown();
    }
    assert!(store.clone().load("tpm2-permall").expect("load").is_some(), "permanent state stored");
    // A restart (new engine, same store) keeps the owner password.
    let mut tpm = engine(TpmVersion::V2_0, &store, false).expect("engine");
    tpm.init(false).expect("init from stored state");
    assert_eq!(rc(&tpm.process(0, &TPM2_STARTUP_CLEAR).expect("startup")), 0);
    assert_ne!(
        rc(&tpm.process(0, &xvtpm_tests::tpm2::change_owner_auth(b"", b"x")).expect("cmd")),
        0,
        "empty password still refused"
    );
    assert_eq!(
        rc(&tpm.process(0, &xvtpm_tests::tpm2::change_owner_auth(b"s3cret", b"")).expect("cmd")),
        0,
        "stored password works"
    );
    let blob = tpm.get_state(StateKind::Permanent).expect("blob");
    assert!(blob.len() > 1000, "permanent blob of {} bytes", blob.len());
}

#[test]
fn missing_state_is_refused_without_create() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let store = Shared::default();
    let mut tpm = engine(TpmVersion::V2_0, &store, false).expect("engine");
    assert!(matches!(tpm.init(false), Err(Error::NoState(_))), "no silent new TPM");
    assert!(store.clone().load("tpm2-permall").expect("load").is_none());
}

#[test]
fn tpm12_startup_and_getrandom() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let store = Shared::default();
    let mut tpm = engine(TpmVersion::V1_2, &store, true).expect("engine");
    tpm.init(false).expect("init");
    let startup = [0x00, 0xc1, 0, 0, 0, 0x0c, 0, 0, 0, 0x99, 0, 0x01];
    assert_eq!(tpm.process(0, &startup).expect("startup"), [0x00, 0xc4, 0, 0, 0, 0x0a, 0, 0, 0, 0]);
    let getrandom = [0x00, 0xc1, 0, 0, 0, 0x0e, 0, 0, 0, 0x46, 0, 0, 0, 0x10];
    let r = tpm.process(0, &getrandom).expect("getrandom");
    assert_eq!((rc(&r), r.len()), (0, 10 + 4 + 16));
}

#[test]
fn a_state_of_the_other_version_is_refused() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let store = Shared::default();
    {
        let mut tpm = engine(TpmVersion::V2_0, &store, true).expect("engine");
        tpm.init(false).expect("init");
    }
    let mut tpm = engine(TpmVersion::V1_2, &store, true).expect("engine");
    let err = tpm.init(false).expect_err("TPM 1.2 over a TPM 2.0 state");
    assert!(err.to_string().contains("holds a TPM 2.0 state"), "{err}");
    assert!(store.clone().load("tpm12-permall").expect("load").is_none(), "nothing created over it");
}
