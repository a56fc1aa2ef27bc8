//! The manager against Debian's swtpm (TPM 2.0) as the hardware TPM: provisioning, save and
//! load across restarts, a changed PCR, a damaged sealed key, an old store copy, and no
//! hardware command to start a vTPM.

mod common;

use xvtpm_vtpmmgr::hw::tpm2::Tpm2;
use xvtpm_vtpmmgr::manager::{InitConfig, Manager};
use xvtpm_vtpmmgr::store::dev::FileDev;
use xvtpm_vtpmmgr::Error;

fn cfg() -> InitConfig {
    InitConfig { pcrs: vec![0, 16], ..InitConfig::default() }
}

fn blob(i: u8) -> Vec<u8> {
    (0..52).map(|j| i.wrapping_mul(31).wrapping_add(j)).collect()
}

#[test]
fn save_and_load_across_restarts_and_what_is_refused() {
    let dir = common::tmpdir("restarts");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let path = dir.join("store.img");
    let uuids: Vec<[u8; 16]> = (1..=3u8).map(|i| [i; 16]).collect();
    {
        let mut m = Manager::init(FileDev::open(&path, true).expect("dev"), hw.connect(), &cfg()).expect("init");
        for u in &uuids {
            m.provision(*u, 0, None).expect("provision");
        }
        assert!(matches!(m.load(&uuids[0]), Err(Error::NoSavedState(_))));
        for (i, u) in uuids.iter().enumerate() {
            m.save(u, &blob(i as u8)).expect("save");
        }
        assert!(matches!(m.save(&[9; 16], &blob(9)), Err(Error::UnknownVtpm(_))), "not provisioned");
        assert!(matches!(m.save(&uuids[0], &[0; 10]), Err(Error::Protocol(_))));
        assert!(matches!(m.provision(uuids[0], 0, None), Err(Error::Store(_))), "twice");
    }
    let copy = std::fs::read(&path).expect("copy the store");
    {
        let mut m = Manager::open(FileDev::open(&path, false).expect("dev"), hw.connect()).expect("reopen");
        let before = m.tpm_commands;
        for (i, u) in uuids.iter().enumerate() {
            assert_eq!(m.load(u).expect("load"), blob(i as u8));
        }
        assert_eq!(m.tpm_commands, before, "starting a vTPM costs no hardware TPM command");
        m.save(&uuids[1], &blob(77)).expect("save again");
        assert_eq!(m.tpm_commands, before + 1, "a save costs one counter increment");
        assert!(m.delete(&uuids[2]).expect("delete"));
    }
    {
        let m = Manager::open(FileDev::open(&path, false).expect("dev"), hw.connect()).expect("reopen");
        assert_eq!(m.load(&uuids[1]).expect("load"), blob(77));
        assert!(matches!(m.load(&uuids[2]), Err(Error::UnknownVtpm(_))));
    }
    // The old copy of the store: refused as a rollback.
    std::fs::write(&path, &copy).expect("restore old copy");
    match Manager::open(FileDev::open(&path, false).expect("dev"), hw.connect()) {
        Err(e @ Error::Rollback { .. }) => assert!(e.to_string().contains("old copy"), "{e}"),
        other => panic!("old copy accepted: {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_changed_pcr_or_a_damaged_sealed_key_stops_the_manager() {
    let dir = common::tmpdir("pcr");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let path = dir.join("store.img");
    {
        let mut m = Manager::init(FileDev::open(&path, true).expect("dev"), hw.connect(), &cfg()).expect("init");
        m.provision([1; 16], 0, None).expect("provision");
    }
    // A byte of the sealed object damaged: the TPM refuses it, or the root does not match.
    let good = std::fs::read(&path).expect("read");
    let mut bad = good.clone();
    bad[2 * 4096 + 40] ^= 0x10;
    std::fs::write(&path, &bad).expect("write");
    let e = Manager::open(FileDev::open(&path, false).expect("dev"), hw.connect()).expect_err("damaged");
    assert!(e.to_string().contains("Load failed") || e.to_string().contains("sealed-key block"), "{e}");
    std::fs::write(&path, &good).expect("write");
    Manager::open(FileDev::open(&path, false).expect("dev"), hw.connect()).expect("intact again");
    // PCR 16 changes: the TPM no longer releases the root key.
    {
        // swtpm serves one client at a time: this connection ends before the manager's.
        let mut tpm = hw.connect();
        Tpm2::new(tpm.as_mut(), 0).pcr_extend(16, &[0xAB; 32]).expect("extend");
    }
    let e = Manager::open(FileDev::open(&path, false).expect("dev"), hw.connect()).expect_err("PCR changed");
    assert!(e.to_string().contains("refused to unseal"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
