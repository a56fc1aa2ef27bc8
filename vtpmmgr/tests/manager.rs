//! The manager against Debian's swtpm as the hardware TPM, in TPM 2.0 and in TPM 1.2 mode:
//! provisioning, save and load across restarts, a changed PCR, a damaged sealed key, an old
//! store copy, and no hardware command to start a vTPM.

mod common;

use xvtpm_tis::Family;
use xvtpm_vtpmmgr::hw::tpm12::Tpm12;
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
fn tpm2_save_and_load_across_restarts_and_what_is_refused() {
    save_and_load(Family::Tpm20);
}

#[test]
fn tpm12_save_and_load_across_restarts_and_what_is_refused() {
    save_and_load(Family::Tpm12);
}

fn save_and_load(family: Family) {
    let dir = common::tmpdir(&format!("restarts-{family}"));
    let hw = common::HwSwtpm::start_family(&dir.join("tpm"), family);
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
        // The counter increment (TPM 1.2: and its OIAP session).
        let per_save = if family == Family::Tpm20 { 1 } else { 2 };
        assert_eq!(m.tpm_commands, before + per_save, "a save costs one counter increment");
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
fn tpm2_a_changed_pcr_or_a_damaged_sealed_key_stops_the_manager() {
    changed_pcr(Family::Tpm20);
}

#[test]
fn tpm12_a_changed_pcr_or_a_damaged_sealed_key_stops_the_manager() {
    changed_pcr(Family::Tpm12);
}

fn changed_pcr(family: Family) {
    let dir = common::tmpdir(&format!("pcr-{family}"));
    let hw = common::HwSwtpm::start_family(&dir.join("tpm"), family);
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
    assert!(
        e.to_string().contains("Load failed")
            || e.to_string().contains("sealed-key block")
            || e.to_string().contains("Unseal failed"),
        "{e}"
    );
    std::fs::write(&path, &good).expect("write");
    Manager::open(FileDev::open(&path, false).expect("dev"), hw.connect()).expect("intact again");
    // PCR 16 changes: the TPM no longer releases the root key.
    {
        // swtpm serves one client at a time: this connection ends before the manager's.
        let mut tpm = hw.connect();
        match family {
            Family::Tpm20 => Tpm2::new(tpm.as_mut(), 0).pcr_extend(16, &[0xAB; 32]).expect("extend"),
            Family::Tpm12 => Tpm12::new(tpm.as_mut(), 0).pcr_extend(16, &[0xAB; 20]).expect("extend"),
        }
    }
    let e = Manager::open(FileDev::open(&path, false).expect("dev"), hw.connect()).expect_err("PCR changed");
    assert!(e.to_string().contains("refused to unseal"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
