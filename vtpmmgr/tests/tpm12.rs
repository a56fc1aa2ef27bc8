//! The TPM 1.2 operations against Debian's swtpm in TPM 1.2 mode: endorsement key, ownership,
//! seal and unseal to PCRs and a locality, and the monotonic counter.

mod common;

use xvtpm_tis::Family;
use xvtpm_vtpmmgr::hw::tpm12::Tpm12;
use xvtpm_vtpmmgr::Error;

#[test]
fn ownership_seal_unseal_and_counter() {
    let dir = common::tmpdir("tpm12");
    let sw = common::HwSwtpm::start_family(&dir, Family::Tpm12);
    let mut hw = sw.connect();
    let mut t = Tpm12::new(hw.as_mut(), 0);
    t.startup().expect("startup");
    assert!(!t.owned().expect("owned?"));
    let (owner, srk, data_auth, ctr_auth) = ([1u8; 20], [0u8; 20], [3u8; 20], [4u8; 20]);
    t.take_ownership(&owner, &srk).expect("take ownership");
    assert!(t.owned().expect("owned?"));
    assert!(t.take_ownership(&owner, &srk).is_err(), "owned already");

    let secret = [0x5Au8; 52];
    // In an encrypted transport session to the SRK, and (stores made before) without one.
    let srk_public = t.srk_public(&owner).expect("the SRK's public key");
    assert!(t.srk_public(&[9; 20]).is_err(), "only with the owner auth");
    let sealed = t.seal(&srk, &data_auth, &secret, &[0, 16], Some(&srk_public)).expect("seal");
    assert_eq!(t.unseal(&srk, &data_auth, &sealed, Some(&srk_public)).expect("unseal"), secret);
    assert_eq!(t.unseal(&srk, &data_auth, &sealed, None).expect("unseal in the clear"), secret);
    let clear = t.seal(&srk, &data_auth, &secret, &[0, 16], None).expect("seal in the clear");
    assert_eq!(t.unseal(&srk, &data_auth, &clear, Some(&srk_public)).expect("unseal"), secret);
    assert!(
        matches!(t.unseal(&srk, &[9; 20], &sealed, Some(&srk_public)), Err(Error::TpmRc { rc: 0x1D, .. })),
        "wrong data auth: TPM_AUTH2FAIL"
    );
    // A transport to another key than the SRK: the TPM cannot read its secret.
    let mut other = srk_public.clone();
    let n = other.len();
    other[n - 5] ^= 0x40;
    assert!(t.unseal(&srk, &data_auth, &sealed, Some(&other)).is_err(), "a transport to another SRK");

    let (id, v0) = t.counter_create(&owner, &ctr_auth).expect("counter");
    assert_eq!(t.counter_increment(id, &ctr_auth).expect("increment"), v0 + 1);
    assert_eq!(t.counter_read(id).expect("read"), v0 + 1);
    assert!(t.counter_increment(id, &[7; 20]).is_err(), "wrong counter auth");

    // Sealed at locality 0: refused at locality 2.
    let mut t2 = Tpm12::new(hw.as_mut(), 2);
    let e = t2.unseal(&srk, &data_auth, &sealed, Some(&srk_public)).expect_err("wrong locality");
    assert!(e.to_string().contains("refused to unseal"), "{e}");
    // PCR 16 changes: refused.
    let mut t = Tpm12::new(hw.as_mut(), 0);
    t.pcr_extend(16, &[0xEE; 20]).expect("extend");
    let e = t.unseal(&srk, &data_auth, &sealed, Some(&srk_public)).expect_err("PCR changed");
    assert!(e.to_string().contains("refused to unseal"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
