//! The TPM 1.2 commands a stock Linux guest kernel sends to its xen-tpmfront chip, byte for byte
//! as measured (shared/notes/xen-in-qemu.md), answered for a TPM 2.0 engine.

use xvtpm_vtpm::libtpms::{Libtpms, LibtpmsConfig};
use xvtpm_vtpm::linux_probe::{answer, DURATIONS_US, TIMEOUTS_US};
use xvtpm_vtpm::state::MemStore;
use xvtpm_vtpm::{TpmEngine, TpmVersion};

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

fn words(b: &[u8]) -> Vec<u32> {
    b.chunks(4).map(|c| u32::from_be_bytes(c.try_into().expect("4"))).collect()
}

#[test]
fn guest_kernel_probe_commands_get_tpm12_answers() {
    let mut tpm = Libtpms::new(LibtpmsConfig {
        version: TpmVersion::V2_0,
        store: Box::new(MemStore::default()),
        create: true,
        label: "mem".into(),
    })
    .expect("engine");
    tpm.init(false).expect("init");
    let startup = [0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x44, 0, 0];
    tpm.process(0, &startup).expect("startup");

    // GetCapability(TPM_CAP_PROPERTY, TPM_CAP_PROP_TIS_TIMEOUT)
    let r = answer(&mut tpm, &hex("00c1 00000016 00000065 00000005 00000004 00000115")).expect("answered");
    assert_eq!(&r[..10], &hex("00c4 0000001e 00000000")[..], "{r:02x?}");
    assert_eq!(words(&r[10..]), [16, TIMEOUTS_US[0], TIMEOUTS_US[1], TIMEOUTS_US[2], TIMEOUTS_US[3]]);
    // ... TPM_CAP_PROP_TIS_DURATION
    let r = answer(&mut tpm, &hex("00c1 00000016 00000065 00000005 00000004 00000120")).expect("answered");
    assert_eq!(words(&r[6..]), [0, 12, DURATIONS_US[0], DURATIONS_US[1], DURATIONS_US[2]]);
    // GetRandom(32) and GetRandom(64), from the TPM 2.0 engine.
    for n in [32u32, 64] {
        let mut cmd = hex("00c1 0000000e 00000046");
        cmd.extend_from_slice(&n.to_be_bytes());
        let r = answer(&mut tpm, &cmd).expect("answered");
        assert_eq!(r.len(), 14 + n as usize);
        assert_eq!(words(&r[6..14]), [0, n]);
        assert!(r[14..].iter().any(|b| *b != 0), "random bytes");
    }
    // sysfs version queries (18-byte form, no sub-capability).
    let r = answer(&mut tpm, &hex("00c1 00000012 00000065 0000001a 00000000")).expect("answered");
    assert_eq!((words(&r[6..14]), &r[14..20]), (vec![0, 15], &[0x00, 0x30, 1, 2, 0, 0][..]));
    let r = answer(&mut tpm, &hex("00c1 00000012 00000065 00000006 00000000")).expect("answered");
    assert_eq!(&r[6..], &hex("00000000 00000004 01010000")[..]);
    // Not ours: TPM 2.0 commands and other TPM 1.2 ordinals go to the engine unchanged.
    assert!(answer(&mut tpm, &startup).is_none());
    assert!(answer(&mut tpm, &hex("00c1 0000000a 0000005a")).is_none());
    // A truncated GetCapability is an error answer, not a panic.
    let r = answer(&mut tpm, &hex("00c1 0000000a 00000065")).expect("answered");
    assert_ne!(words(&r[6..10]), [0]);
}
