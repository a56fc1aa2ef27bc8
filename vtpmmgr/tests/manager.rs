//! The manager against Debian's swtpm as the hardware TPM, in TPM 2.0 and in TPM 1.2 mode:
//! provisioning, save and load across restarts, a changed PCR, a damaged sealed key, an old
//! store copy, and no hardware command to start a vTPM.

mod common;

use std::path::{Path, PathBuf};

use xvtpm_tis::Family;
use xvtpm_vtpmmgr::hw::tpm12::Tpm12;
use xvtpm_vtpmmgr::hw::tpm2::Tpm2;
use xvtpm_vtpmmgr::hw::Sealed;
use xvtpm_vtpmmgr::manager::{InitConfig, Manager};
use xvtpm_vtpmmgr::store::dev::FileDev;
use xvtpm_vtpmmgr::store::Store;
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
        let mut m = Manager::init(common::dev(&path, true), hw.connect(), &cfg()).expect("init");
        for u in &uuids {
            m.provision(*u, 0, None).expect("provision");
        }
        assert!(matches!(m.load(&uuids[0]), Err(Error::NoSavedState(_))));
        for (i, u) in uuids.iter().enumerate() {
            m.save(u, &blob(i as u8)).expect("save");
        }
        assert!(matches!(m.save(&[9; 16], &blob(9)), Err(Error::UnknownVtpm(_))), "not provisioned");
        assert!(matches!(m.save(&uuids[0], &[0; 10]), Err(Error::Protocol(_))));
        assert!(matches!(m.provision(uuids[0], 0, None), Err(Error::Exists(_))), "twice");
    }
    // A second init on the same store is refused before it touches the TPM.
    let e = Manager::init(common::dev(&path, false), hw.connect(), &cfg()).expect_err("exists");
    assert!(e.to_string().contains("already holds data"), "{e}");
    if family == Family::Tpm20 {
        // A new store on the same TPM with the same counter index: refused, saying why.
        let e =
            Manager::init(common::dev(&dir.join("second.img"), true), hw.connect(), &cfg()).expect_err("index taken");
        assert!(
            e.to_string().contains("already exists on the hardware TPM") && e.to_string().contains("--nv-index"),
            "{e}"
        );
    }
    let copy = std::fs::read(&path).expect("copy the store");
    {
        let mut m = Manager::open(common::dev(&path, false), hw.connect()).expect("reopen");
        let before = m.tpm_commands;
        for (i, u) in uuids.iter().enumerate() {
            assert_eq!(m.load(u).expect("load"), blob(i as u8));
        }
        assert_eq!(m.tpm_commands, before, "starting a vTPM costs no hardware TPM command");
        m.save(&uuids[1], &blob(77)).expect("save again");
        // The counter read before the commit, then its increment, read back. TPM 2.0: each
        // read and the increment in HMAC sessions (StartAuthSession, NV_Read; StartAuthSession,
        // NV_Increment, NV_Read). TPM 1.2: ReadCounter; OIAP, IncrementCounter (whose
        // authenticated response carries the new value).
        let per_save = if family == Family::Tpm20 { 5 } else { 3 };
        assert_eq!(m.tpm_commands, before + per_save, "a save costs one counter increment and two reads");
        assert!(m.delete(&uuids[2]).expect("delete"));
    }
    {
        let m = Manager::open(common::dev(&path, false), hw.connect()).expect("reopen");
        assert_eq!(m.load(&uuids[1]).expect("load"), blob(77));
        assert!(matches!(m.load(&uuids[2]), Err(Error::UnknownVtpm(_))));
    }
    // The old copy of the store: refused as a rollback.
    std::fs::write(&path, &copy).expect("restore old copy");
    match Manager::open(common::dev(&path, false), hw.connect()) {
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
        let mut m = Manager::init(common::dev(&path, true), hw.connect(), &cfg()).expect("init");
        m.provision([1; 16], 0, None).expect("provision");
    }
    // A byte of the sealed object damaged: the TPM refuses it, or the root does not match.
    let good = std::fs::read(&path).expect("read");
    let mut bad = good.clone();
    bad[2 * 4096 + 40] ^= 0x10;
    std::fs::write(&path, &bad).expect("write");
    let e = Manager::open(common::dev(&path, false), hw.connect()).expect_err("damaged");
    assert!(
        e.to_string().contains("Load failed")
            || e.to_string().contains("sealed-key block")
            || e.to_string().contains("Unseal failed"),
        "{e}"
    );
    std::fs::write(&path, &good).expect("write");
    Manager::open(common::dev(&path, false), hw.connect()).expect("intact again");
    // PCR 16 changes: the TPM no longer releases the root key.
    {
        // swtpm serves one client at a time: this connection ends before the manager's.
        let mut tpm = hw.connect();
        match family {
            Family::Tpm20 => Tpm2::new(tpm.as_mut(), 0).pcr_extend(16, &[0xAB; 32]).expect("extend"),
            Family::Tpm12 => Tpm12::new(tpm.as_mut(), 0).pcr_extend(16, &[0xAB; 20]).expect("extend"),
        }
    }
    let e = Manager::open(common::dev(&path, false), hw.connect()).expect_err("PCR changed");
    assert!(e.to_string().contains("refused to unseal"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TPM2B at `at`: its bytes and the offset after it.
fn b2(b: &[u8], at: usize) -> (&[u8], usize) {
    let n = u16::from_be_bytes([b[at], b[at + 1]]) as usize;
    (&b[at + 2..at + 2 + n], at + 2 + n)
}

#[test]
fn tpm2_deep_quote_binds_the_vtpm_and_its_nonce() {
    use p256::ecdsa::signature::hazmat::PrehashVerifier;
    use sha2::{Digest, Sha256};
    let dir = common::tmpdir("quote");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    // PCR 16 starts at zero; extend it with a known digest.
    {
        let mut tpm = hw.connect();
        Tpm2::new(tpm.as_mut(), 0).startup().expect("startup");
        Tpm2::new(tpm.as_mut(), 0).pcr_extend(16, &[0xCD; 32]).expect("extend");
    }
    let pcr16: [u8; 32] = Sha256::new().chain_update([0u8; 32]).chain_update([0xCD; 32]).finalize().into();
    let path = dir.join("store.img");
    let mut m = Manager::init(common::dev(&path, true), hw.connect(), &cfg()).expect("init");
    let uuid = [0x42u8; 16];
    m.provision(uuid, 0, None).expect("provision");
    assert!(matches!(m.quote(&[1; 16], None, &[0; 20], &[16]), Err(Error::UnknownVtpm(_))), "only provisioned vTPMs");
    let nonce = [7u8; 20];
    let msg = xvtpm_proto::tpm::frame(
        xvtpm_proto::mgr::TAG_REQ,
        xvtpm_proto::mgr::ord::GET_QUOTE,
        &[&nonce[..], &[0, 3, 0, 0, 1]].concat(),
    );
    // The transport measured the vTPM: its boot hash is part of the quoted data.
    let boot = [0xB0u8; 32];
    let rsp =
        xvtpm_vtpmmgr::dispatch::handle(&mut m, &mut xvtpm_vtpmmgr::dispatch::Caller::Vtpm(uuid), Some(&boot), &msg);
    assert_eq!(&rsp[6..10], &[0, 0, 0, 0], "status");
    let body = &rsp[10..];
    let (public, at) = b2(body, 0);
    let (attest, at) = b2(body, at);
    let (sig, _) = b2(body, at);
    // TPMS_ATTEST: magic, TPM_ST_ATTEST_QUOTE, signer,
    // extraData = H("xvtpm-deep-quote"||uuid||boot hash||nonce).
    assert_eq!(&attest[..6], &[0xFF, 0x54, 0x43, 0x47, 0x80, 0x18]);
    let (_, at) = b2(attest, 6);
    let (extra, at) = b2(attest, at);
    let want: [u8; 32] = Sha256::new()
        .chain_update(b"xvtpm-deep-quote")
        .chain_update(uuid)
        .chain_update(boot)
        .chain_update(nonce)
        .finalize()
        .into();
    assert_eq!(extra, want);
    let at = at + 17 + 8;
    assert_eq!(&attest[at..at + 4], &[0, 0, 0, 1], "one PCR selection");
    let (digest, _) = b2(attest, at + 4 + 2 + 1 + 3);
    assert_eq!(digest, Sha256::digest(pcr16).as_slice(), "the quoted PCR 16");
    // The signature verifies under the attestation key's public point.
    let (_, at) = b2(public, 8);
    let at = at + 10;
    let (x, at) = b2(public, at);
    let (y, _) = b2(public, at);
    let point = p256::EncodedPoint::from_affine_coordinates(x.into(), y.into(), false);
    let key = p256::ecdsa::VerifyingKey::from_encoded_point(&point).expect("AK point");
    assert_eq!(&sig[..4], &[0x00, 0x18, 0x00, 0x0B], "ECDSA-SHA256");
    let (r, at) = b2(sig, 4);
    let (s, _) = b2(sig, at);
    let signature =
        p256::ecdsa::Signature::from_scalars(*p256::FieldBytes::from_slice(r), *p256::FieldBytes::from_slice(s))
            .expect("signature");
    key.verify_prehash(&Sha256::digest(attest), &signature).expect("the quote verifies");
    let mut forged = attest.to_vec();
    forged[40] ^= 1;
    assert!(key.verify_prehash(&Sha256::digest(&forged), &signature).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Forwards to the TPM, but reports the first NV_Increment as failed after the TPM executed it
/// (a lost response).
struct LostIncrement {
    inner: Box<dyn xvtpm_tis::HwTpm + Send>,
    lost: bool,
}

impl xvtpm_tis::HwTpm for LostIncrement {
    fn transmit(&mut self, locality: u8, command: &[u8]) -> xvtpm_tis::Result<Vec<u8>> {
        let r = self.inner.transmit(locality, command)?;
        if !self.lost && command.get(6..10) == Some(&[0, 0, 1, 0x34]) {
            self.lost = true;
            return Err(xvtpm_tis::Error::CommandTimeout { ordinal: 0x134, waited: std::time::Duration::ZERO });
        }
        Ok(r)
    }
    fn family(&self) -> Family {
        self.inner.family()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[test]
fn a_lost_counter_increment_never_overshoots() {
    let dir = common::tmpdir("lost-increment");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let path = dir.join("store.img");
    {
        let mut m = Manager::init(common::dev(&path, true), hw.connect(), &cfg()).expect("init");
        m.provision([1; 16], 0, None).expect("provision");
    }
    {
        let flaky = Box::new(LostIncrement { inner: hw.connect(), lost: false });
        let mut m = Manager::open(common::dev(&path, false), flaky).expect("open");
        // The save is durable; its increment executed but its response was lost.
        m.save(&[1; 16], &blob(1)).expect("save");
        // The next save reads the counter before incrementing again.
        m.save(&[1; 16], &blob(2)).expect("save");
    }
    let m = Manager::open(common::dev(&path, false), hw.connect()).expect("no false rollback");
    assert_eq!(m.load(&[1; 16]).expect("load"), blob(2));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A manager store with one vTPM: its directory, TPM, path, counter value and sealed-key block.
fn store_with_one_vtpm(family: Family) -> (PathBuf, common::HwSwtpm, PathBuf, u64, Sealed) {
    let dir = common::tmpdir(&format!("substitute-{family}"));
    let hw = common::HwSwtpm::start_family(&dir.join("tpm"), family);
    let path = dir.join("store.img");
    let counter = {
        let mut m = Manager::init(common::dev(&path, true), hw.connect(), &cfg()).expect("init");
        m.provision([1; 16], 0, None).expect("provision");
        m.store().root().counter
    };
    let block = xvtpm_vtpmmgr::store::read_sealed(&mut common::dev(&path, false)).expect("read");
    (dir, hw, path, counter, Sealed::decode(&block).expect("decode"))
}

/// Replaces the store at `path` with an empty one under `key`, sealed-key block `sealed`, at
/// counter value `counter`: what someone with write access to the disk could do.
fn replace_store(path: &Path, key: [u8; 32], sealed: &Sealed, counter: u64) {
    std::fs::remove_file(path).expect("rm");
    Store::create(common::dev(path, true), key, &sealed.encode(), counter).expect("fake store");
}

/// A store substituted by someone with access to the TPM 1.2 while the platform was not in
/// the approved state: their blob is sealed to release in the approved state, so the TPM
/// unseals it, but its creation digest gives it away.
#[test]
fn tpm12_a_substituted_store_is_refused() {
    let (dir, hw, path, counter, sealed) = store_with_one_vtpm(Family::Tpm12);
    {
        let mut tpm = hw.connect();
        let mut t = Tpm12::new(tpm.as_mut(), 0);
        let approved = t.composite(&[0, 16]).expect("approved state");
        // The platform leaves the approved state; the attacker seals their own key so that it
        // releases in the approved state, and writes a store under it.
        t.pcr_extend(16, &[0x66; 20]).expect("extend");
        let key = [0x99u8; 32];
        let payload = [&key[..], &[0u8; 20]].concat();
        let forged = t.seal_to(&[0; 20], &[0; 20], &payload, &[0, 16], Some(approved), None).expect("seal");
        t.pcr_reset(16).expect("back to the approved state");
        replace_store(&path, key, &Sealed { private: forged, ..sealed }, counter);
    }
    let e = Manager::open(common::dev(&path, false), hw.connect()).expect_err("substituted");
    assert!(e.to_string().contains("not sealed by this manager"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same on TPM 2.0: someone seals their own key, in another platform state, under the
/// policy of the approved state; the TPM unseals it there, but the creation ticket gives it
/// away.
#[test]
fn tpm2_a_substituted_store_is_refused() {
    let (dir, hw, path, counter, sealed) = store_with_one_vtpm(Family::Tpm20);
    {
        let mut tpm = hw.connect();
        let mut t = Tpm2::new(tpm.as_mut(), 0);
        let approved = t.pcr_policy(&[0, 16]).expect("the approved state's policy");
        t.pcr_extend(16, &[0x66; 32]).expect("extend");
        let key = [0x99u8; 32];
        let (private, public, creation) = t.seal_to(&key, &[0, 16], Some(approved)).expect("seal");
        t.pcr_reset(16).expect("back to the approved state");
        replace_store(&path, key, &Sealed { private, public, creation, ..sealed }, counter);
    }
    let e = Manager::open(common::dev(&path, false), hw.connect()).expect_err("substituted");
    assert!(e.to_string().contains("not created by this manager"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tpm12_deep_quote_binds_the_vtpm_and_its_nonce() {
    use rsa::traits::PublicKeyParts;
    use rsa::BigUint;
    use sha1::Sha1;
    use sha2::{Digest, Sha256};
    let dir = common::tmpdir("quote12");
    let hw = common::HwSwtpm::start_family(&dir.join("tpm"), Family::Tpm12);
    // PCR 16 starts at zero; extend it with a known digest.
    {
        let mut tpm = hw.connect();
        let mut t = Tpm12::new(tpm.as_mut(), 0);
        t.startup().expect("startup");
        t.pcr_extend(16, &[0xCD; 20]).expect("extend");
    }
    let pcr16: [u8; 20] = Sha1::new().chain_update([0u8; 20]).chain_update([0xCD; 20]).finalize().into();
    let path = dir.join("store.img");
    let mut m = Manager::init(common::dev(&path, true), hw.connect(), &cfg()).expect("init");
    let uuid = [0x42u8; 16];
    m.provision(uuid, 0, None).expect("provision");
    assert!(matches!(m.quote(&[1; 16], None, &[0; 20], &[16]), Err(Error::UnknownVtpm(_))), "only provisioned vTPMs");
    let get_quote = |m: &mut Manager<FileDev>, nonce: &[u8; 20]| {
        let msg = xvtpm_proto::tpm::frame(
            xvtpm_proto::mgr::TAG_REQ,
            xvtpm_proto::mgr::ord::GET_QUOTE,
            &[&nonce[..], &[0, 3, 0, 0, 1]].concat(),
        );
        let rsp = xvtpm_vtpmmgr::dispatch::handle(m, &mut xvtpm_vtpmmgr::dispatch::Caller::Vtpm(uuid), None, &msg);
        assert_eq!(&rsp[6..10], &[0, 0, 0, 0], "status");
        let body = &rsp[10..];
        let (public, at) = b2(body, 0);
        let (info, at) = b2(body, at);
        let (sig, _) = b2(body, at);
        (public.to_vec(), info.to_vec(), sig.to_vec())
    };
    let nonce = [7u8; 20];
    let (public, info, sig) = get_quote(&mut m, &nonce);
    // TPM_QUOTE_INFO: 1.1.0.0, "QUOT", SHA-1 of the TPM_PCR_COMPOSITE of PCR 16, and the first
    // 20 bytes of H("xvtpm-deep-quote"||uuid||boot hash||nonce), the boot hash all zeros (the
    // caller was not measured).
    let composite = [&[0, 3, 0, 0, 1, 0, 0, 0, 20][..], &pcr16].concat();
    let q = Sha256::new()
        .chain_update(b"xvtpm-deep-quote")
        .chain_update(uuid)
        .chain_update([0u8; 32])
        .chain_update(nonce)
        .finalize();
    let want = [&[1, 1, 0, 0][..], b"QUOT", &Sha1::digest(&composite), &q[..20]].concat();
    assert_eq!(info, want);
    // TPM_PUBKEY: RSA, no encryption, PKCS#1 v1.5 SHA-1 signatures, 2048 bits, e = 65537.
    assert_eq!(&public[..8], &[0, 0, 0, 1, 0, 1, 0, 2]);
    let parm_size = u32::from_be_bytes(public[8..12].try_into().expect("4")) as usize;
    let at = 12 + parm_size;
    let n_len = u32::from_be_bytes(public[at..at + 4].try_into().expect("4")) as usize;
    let key = rsa::RsaPublicKey::new(BigUint::from_bytes_be(&public[at + 4..at + 4 + n_len]), BigUint::from(65537u32))
        .expect("key");
    assert_eq!(key.size(), 256);
    // The signature opens to EMSA-PKCS1-v1_5(SHA-1(info)).
    let verifies = |info: &[u8]| {
        let opened = BigUint::from_bytes_be(&sig).modpow(key.e(), key.n()).to_bytes_be();
        let digest_info = [
            &[0x30, 0x21, 0x30, 0x09, 0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x1a, 0x05, 0x00, 0x04, 0x14][..],
            &Sha1::digest(info),
        ]
        .concat();
        let mut em = vec![0x01];
        em.resize(255 - digest_info.len() - 1, 0xFF);
        em.push(0);
        em.extend_from_slice(&digest_info);
        opened == em
    };
    assert!(verifies(&info), "the quote verifies");
    let mut forged = info.clone();
    forged[30] ^= 1;
    assert!(!verifies(&forged), "a changed quote does not");
    // The key is made once: a second quote loads it, quotes and unloads it (5 commands).
    let before = m.tpm_commands;
    let (public2, info2, _) = get_quote(&mut m, &[8; 20]);
    assert_eq!(public2, public, "same quote key");
    assert_ne!(info2, info, "another nonce");
    assert_eq!(m.tpm_commands - before, 5);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A vTPM looping on GET_QUOTE gets TPM_RETRY once over its allowance; another vTPM still gets
/// its quotes, and the first earns quotes back with time.
#[test]
fn get_quote_is_rate_limited_per_vtpm() {
    use xvtpm_proto::mgr::{ord::GET_QUOTE, status, TAG_REQ};
    use xvtpm_vtpmmgr::dispatch::{self, Caller};
    use xvtpm_vtpmmgr::pace::Rate;
    let dir = common::tmpdir("quote-rate");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let mut m =
        Manager::init(FileDev::open(&dir.join("store.img"), true).expect("dev"), hw.connect(), &cfg()).expect("init");
    let (a, b) = ([0xAA; 16], [0xBB; 16]);
    m.provision(a, 0, None).expect("provision a");
    m.provision(b, 0, None).expect("provision b");
    // Long enough that no quote is earned back while the test runs, however loaded the machine.
    m.quotes.rate = Rate { burst: 2, interval: std::time::Duration::from_secs(30) };
    let msg = xvtpm_proto::tpm::frame(TAG_REQ, GET_QUOTE, &[&[5u8; 20][..], &[0, 3, 0, 0, 1]].concat());
    let status_of = |m: &mut Manager<FileDev>, u: [u8; 16]| {
        let rsp = dispatch::handle(m, &mut Caller::Vtpm(u), None, &msg);
        u32::from_be_bytes(rsp[6..10].try_into().expect("4"))
    };
    assert_eq!(status_of(&mut m, a), status::SUCCESS);
    assert_eq!(status_of(&mut m, a), status::SUCCESS);
    let before = m.tpm_commands;
    assert_eq!(status_of(&mut m, a), status::RETRY, "a third quote at once");
    assert_eq!(m.tpm_commands, before, "a refused quote costs no hardware command");
    assert!(matches!(m.quote(&a, None, &[0; 20], &[16]), Err(Error::Busy(_))));
    assert_eq!(status_of(&mut m, b), status::SUCCESS, "another vTPM is not held back");
    // Time earns quotes back (the allowance counts time since the last request).
    m.quotes.rate.interval = std::time::Duration::from_millis(100);
    std::thread::sleep(std::time::Duration::from_millis(150));
    assert_eq!(status_of(&mut m, a), status::SUCCESS, "one more after the interval");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The hardware TPM, answering TPM_RC_NV_RATE (it throttles NV writes) to the next `left`
/// NV_Increment commands without running them, as a chip protecting its flash does.
struct Throttled {
    inner: Box<dyn xvtpm_tis::HwTpm + Send>,
    left: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl xvtpm_tis::HwTpm for Throttled {
    fn transmit(&mut self, locality: u8, command: &[u8]) -> xvtpm_tis::Result<Vec<u8>> {
        use std::sync::atomic::Ordering::SeqCst;
        const CC_NV_INCREMENT: [u8; 4] = [0, 0, 0x01, 0x34];
        if command.get(6..10) == Some(&CC_NV_INCREMENT[..])
            && self.left.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok()
        {
            return Ok(vec![0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x09, 0x20]);
        }
        self.inner.transmit(locality, command)
    }
    fn family(&self) -> Family {
        self.inner.family()
    }
    fn describe(&self) -> String {
        format!("{} (throttled)", self.inner.describe())
    }
    fn owns_tpm(&self) -> bool {
        self.inner.owns_tpm()
    }
}

#[test]
fn tpm2_a_rate_limited_counter_is_waited_for_not_fatal() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let dir = common::tmpdir("nv-rate");
    let hw = common::HwSwtpm::start(&dir.join("tpm"));
    let path = dir.join("store.img");
    let left = std::sync::Arc::new(AtomicUsize::new(0));
    let throttled = || Box::new(Throttled { inner: hw.connect(), left: left.clone() });
    let u = [7u8; 16];
    {
        let mut m = Manager::init(common::dev(&path, true), throttled(), &cfg()).expect("init");
        m.provision(u, 0, None).expect("provision");
        left.store(3, SeqCst);
        m.save(&u, &blob(1)).expect("a save whose counter increment the TPM throttled three times");
        assert_eq!(left.load(SeqCst), 0, "the TPM was asked again after each NV_RATE");
        assert!(m.halted().is_none());
        assert_eq!(m.load(&u).expect("load"), blob(1));
    }
    // The counter is where the store says: the store opens, the save is there.
    let m = Manager::open(common::dev(&path, false), throttled()).expect("reopen");
    assert_eq!(m.load(&u).expect("load after reopen"), blob(1));
}
