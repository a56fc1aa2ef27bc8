//! Answers for the TPM 1.2 commands a stock Linux guest sends by itself to a xen-tpmfront TPM.
//!
//! Linux's xen-tpmfront never marks its chip as TPM 2.0, so the guest kernel talks TPM 1.2 to it:
//! GetCapability for the TIS timeouts and command durations at probe, GetRandom for the hardware
//! RNG (every ~10 s), and version and flag queries when sysfs is read. A TPM 2.0 engine rejects
//! all of them, which leaves the guest with zero timeouts (2 minutes per command), no hwrng and
//! errors in dmesg. These answers make the probe clean without touching the guest kernel; user
//! space still talks TPM 2.0 through /dev/tpm0, and random bytes come from the TPM 2.0 engine.

use xvtpm_proto::tpm::{self, be32};

use crate::engine::TpmEngine;

const TPM_TAG_RQU_COMMAND: u16 = tpm::TPM_TAG_RQU_COMMAND;
const TPM_ORD_GET_CAPABILITY: u32 = 0x65;
const TPM_ORD_GET_RANDOM: u32 = tpm::ord::GET_RANDOM;
const TPM_CAP_FLAG: u32 = 4;
const TPM_CAP_PROP: u32 = 5;
const TPM_CAP_VERSION: u32 = 0x06;
const TPM_CAP_VERSION_VAL: u32 = 0x1a;
const TPM_CAP_PROP_MANUFACTURER: u32 = 0x103;
const TPM_CAP_FLAG_PERMANENT: u32 = 0x108;
const TPM_CAP_FLAG_VOLATILE: u32 = 0x109;
const TPM_CAP_PROP_TIS_TIMEOUT: u32 = 0x115;
const TPM_CAP_PROP_TIS_DURATION: u32 = 0x120;
const TPM_BAD_PARAMETER: u32 = 3;
const TPM_BAD_MODE: u32 = 0x2c;
const TPM_FAIL: u32 = 9;

/// TIS timeouts A-D in microseconds (the PC Client defaults: 750 ms, 2 s, 750 ms, 750 ms).
pub const TIMEOUTS_US: [u32; 4] = [750_000, 2_000_000, 750_000, 750_000];
/// Command durations short, medium, long in microseconds (3 s, 30 s, 300 s).
pub const DURATIONS_US: [u32; 3] = [3_000_000, 30_000_000, 300_000_000];
/// The largest GetRandom answered at once (the guest asks for 32 or 64).
const MAX_RANDOM: usize = 4096;

fn response(rc: u32, body: &[u8]) -> Vec<u8> {
    tpm::frame(tpm::TPM_TAG_RSP_COMMAND, rc, body)
}

/// A capability answer: `u32 length | data`.
fn cap(data: &[u8]) -> Vec<u8> {
    let mut body = (data.len() as u32).to_be_bytes().to_vec();
    body.extend_from_slice(data);
    response(0, &body)
}

fn words(ws: &[u32]) -> Vec<u8> {
    ws.iter().flat_map(|w| w.to_be_bytes()).collect()
}

/// If `cmd` is one of the TPM 1.2 commands a Linux guest kernel sends on its own, the answer;
/// `None` for everything else (which goes to the engine unchanged).
pub fn answer(engine: &mut dyn TpmEngine, cmd: &[u8]) -> Option<Vec<u8>> {
    if cmd.len() < 10 || u16::from_be_bytes([cmd[0], cmd[1]]) != TPM_TAG_RQU_COMMAND {
        return None;
    }
    match be32(cmd, 6)? {
        TPM_ORD_GET_CAPABILITY => Some(get_capability(cmd)),
        TPM_ORD_GET_RANDOM => Some(get_random(engine, cmd)),
        _ => None,
    }
}

fn get_capability(cmd: &[u8]) -> Vec<u8> {
    let Some(area) = be32(cmd, 10) else { return response(TPM_BAD_PARAMETER, &[]) };
    let sub = be32(cmd, 18);
    match (area, sub) {
        (TPM_CAP_PROP, Some(TPM_CAP_PROP_TIS_TIMEOUT)) => cap(&words(&TIMEOUTS_US)),
        (TPM_CAP_PROP, Some(TPM_CAP_PROP_TIS_DURATION)) => cap(&words(&DURATIONS_US)),
        // "IBM", libtpms' manufacturer, as its TPM 2.0 reports it.
        (TPM_CAP_PROP, Some(TPM_CAP_PROP_MANUFACTURER)) => cap(&0x4942_4d00u32.to_be_bytes()),
        // TPM_STRUCT_VER 1.1.0.0.
        (TPM_CAP_VERSION, _) => cap(&[1, 1, 0, 0]),
        // TPM_CAP_VERSION_INFO: tag, version 1.2, spec level 2, errata 3, vendor "IBM", no
        // vendor data.
        (TPM_CAP_VERSION_VAL, _) => cap(&[0x00, 0x30, 1, 2, 0, 0, 0, 2, 3, b'I', b'B', b'M', 0, 0, 0]),
        // TPM_PERMANENT_FLAGS (tag 0x1f, 20 flags): enabled, active, no owner.
        (TPM_CAP_FLAG, Some(TPM_CAP_FLAG_PERMANENT)) => {
            let mut f = vec![0x00, 0x1f];
            f.extend_from_slice(&[0u8; 20]);
            cap(&f)
        }
        // TPM_STCLEAR_FLAGS (tag 0x20): not deactivated.
        (TPM_CAP_FLAG, Some(TPM_CAP_FLAG_VOLATILE)) => cap(&[0x00, 0x20, 0, 0, 0, 0, 0]),
        _ => response(TPM_BAD_MODE, &[]),
    }
}

fn get_random(engine: &mut dyn TpmEngine, cmd: &[u8]) -> Vec<u8> {
    let Some(want) = be32(cmd, 10) else { return response(TPM_BAD_PARAMETER, &[]) };
    let want = (want as usize).min(MAX_RANDOM);
    let mut bytes = Vec::with_capacity(want);
    while bytes.len() < want {
        let n = (want - bytes.len()).min(32) as u16;
        let mut c = vec![0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b];
        c.extend_from_slice(&n.to_be_bytes());
        match engine.process(0, &c) {
            // TPM2 response: header, TPM2B size, bytes.
            Ok(r) if be32(&r, 6) == Some(0) && r.len() >= 12 => {
                let got = u16::from_be_bytes([r[10], r[11]]) as usize;
                match r.get(12..12 + got) {
                    Some(b) if got > 0 => bytes.extend_from_slice(b),
                    _ => return response(TPM_FAIL, &[]),
                }
            }
            _ => return response(TPM_FAIL, &[]),
        }
    }
    let mut body = (bytes.len() as u32).to_be_bytes().to_vec();
    body.extend_from_slice(&bytes);
    response(0, &body)
}
