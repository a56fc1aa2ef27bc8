//! The checks `tpm-mmio-check` runs against a hardware TPM, over any [`HwTpm`]: random bytes,
//! PCR read and extend at localities 0 and 2, a locality-restricted PCR reset, a 1 KiB hash
//! and a command of at least 3 KiB. Results are `key=value` pairs that a verifier elsewhere
//! recomputes (digests) and compares; nothing here decides pass or fail.

use crate::command::{be32, response_code, HEADER_SIZE};
use crate::{Family, HwTpm};

/// The data hashed by the hash checks: `n` bytes anyone can regenerate.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 13 + 7) as u8).collect()
}

/// The digest extended at locality 0 (and, with its last byte changed, at locality 2).
pub const EXTEND_DIGEST_BYTE: u8 = 0x11;
/// The digest byte extended at locality 2.
pub const EXTEND_DIGEST_BYTE_L2: u8 = 0x22;
/// Size of the large command.
pub const BIG_COMMAND: usize = 3072;

/// Hex of bytes, lower case.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct Run<'a> {
    tpm: &'a mut dyn HwTpm,
    out: Vec<(String, String)>,
}

impl Run<'_> {
    fn put(&mut self, k: &str, v: impl Into<String>) {
        self.out.push((k.to_string(), v.into()));
    }

    /// Sends; on a transport error records it under `k` and returns `None`.
    fn send(&mut self, k: &str, loc: u8, cmd: &[u8]) -> Option<Vec<u8>> {
        match self.tpm.transmit(loc, cmd) {
            Ok(r) => Some(r),
            Err(e) => {
                self.put(k, format!("error: {e}"));
                None
            }
        }
    }

    /// Sends and records the response code under `k`.
    fn rc(&mut self, k: &str, loc: u8, cmd: &[u8]) -> Option<Vec<u8>> {
        let r = self.send(k, loc, cmd)?;
        self.put(k, format!("{:#x}", response_code(&r)));
        Some(r)
    }

    /// Sends and records `extract(response)` as hex under `k`, or the response code.
    fn value(&mut self, k: &str, loc: u8, cmd: &[u8], extract: impl Fn(&[u8]) -> Option<&[u8]>) -> Option<Vec<u8>> {
        let r = self.send(k, loc, cmd)?;
        match extract(&r) {
            Some(v) if response_code(&r) == 0 => {
                let v = v.to_vec();
                self.put(k, hex(&v));
                Some(v)
            }
            _ => {
                self.put(k, format!("rc {:#x}", response_code(&r)));
                None
            }
        }
    }
}

use xvtpm_proto::tpm::frame as cmd;

mod tpm2 {
    use super::cmd;

    const NO_SESSIONS: u16 = 0x8001;
    const SESSIONS: u16 = 0x8002;
    const SHA256: u16 = 0x000B;

    /// An empty password session.
    fn pw_session() -> Vec<u8> {
        let mut s = 9u32.to_be_bytes().to_vec();
        s.extend_from_slice(&0x4000_0009u32.to_be_bytes());
        s.extend_from_slice(&[0, 0, 0, 0, 0]);
        s
    }

    use xvtpm_proto::tpm::{self, Family, StartupType};

    pub fn startup_clear() -> Vec<u8> {
        tpm::startup(Family::Tpm20, StartupType::Clear).unwrap_or_default()
    }

    pub fn get_random(n: u16) -> Vec<u8> {
        tpm::get_random(Family::Tpm20, n)
    }

    pub fn pcr_read(pcr: u32) -> Vec<u8> {
        let mut sel = [0u8; 3];
        sel[(pcr / 8) as usize] = 1 << (pcr % 8);
        let mut b = 1u32.to_be_bytes().to_vec();
        b.extend_from_slice(&SHA256.to_be_bytes());
        b.push(3);
        b.extend_from_slice(&sel);
        cmd(NO_SESSIONS, 0x17E, &b)
    }

    /// The one digest of a PCR_Read response.
    pub fn pcr_value(r: &[u8]) -> Option<&[u8]> {
        let mut at = 14;
        let sels = super::be32(r, at)? as usize;
        at += 4;
        for _ in 0..sels.min(16) {
            at += 3 + *r.get(at + 2)? as usize;
        }
        if super::be32(r, at)? != 1 {
            return None;
        }
        let n = u16::from_be_bytes([*r.get(at + 4)?, *r.get(at + 5)?]) as usize;
        r.get(at + 6..at + 6 + n)
    }

    pub fn pcr_extend(pcr: u32, digest: &[u8; 32]) -> Vec<u8> {
        let mut b = pcr.to_be_bytes().to_vec();
        b.extend_from_slice(&pw_session());
        b.extend_from_slice(&1u32.to_be_bytes());
        b.extend_from_slice(&SHA256.to_be_bytes());
        b.extend_from_slice(digest);
        cmd(SESSIONS, 0x182, &b)
    }

    pub fn pcr_reset(pcr: u32) -> Vec<u8> {
        let mut b = pcr.to_be_bytes().to_vec();
        b.extend_from_slice(&pw_session());
        cmd(SESSIONS, 0x13D, &b)
    }

    pub fn hash(data: &[u8]) -> Vec<u8> {
        let mut b = (data.len() as u16).to_be_bytes().to_vec();
        b.extend_from_slice(data);
        b.extend_from_slice(&SHA256.to_be_bytes());
        b.extend_from_slice(&0x4000_0007u32.to_be_bytes());
        cmd(NO_SESSIONS, 0x17D, &b)
    }

    /// A GetRandom padded to `size` bytes: a well-formed header over trailing bytes, which the
    /// TPM answers with TPM_RC_SIZE only after receiving all of them.
    pub fn padded_get_random(size: usize) -> Vec<u8> {
        let mut c = get_random(16);
        c.resize(size, 0x5A);
        c[2..6].copy_from_slice(&(size as u32).to_be_bytes());
        c
    }
}

mod tpm12 {
    use super::cmd;

    const RQU: u16 = 0x00C1;

    use xvtpm_proto::tpm::{self, Family, StartupType};

    pub fn startup_clear() -> Vec<u8> {
        tpm::startup(Family::Tpm12, StartupType::Clear).unwrap_or_default()
    }

    pub fn get_random(n: u16) -> Vec<u8> {
        tpm::get_random(Family::Tpm12, n)
    }

    pub fn pcr_read(pcr: u32) -> Vec<u8> {
        cmd(RQU, 0x15, &pcr.to_be_bytes())
    }

    pub fn extend(pcr: u32, digest: &[u8; 20]) -> Vec<u8> {
        let mut b = pcr.to_be_bytes().to_vec();
        b.extend_from_slice(digest);
        cmd(RQU, 0x14, &b)
    }

    pub fn pcr_reset(pcr: u32) -> Vec<u8> {
        let mut sel = [0u8; 3];
        sel[(pcr / 8) as usize] = 1 << (pcr % 8);
        let mut b = 3u16.to_be_bytes().to_vec();
        b.extend_from_slice(&sel);
        cmd(RQU, 0xC8, &b)
    }

    pub fn sha1_start() -> Vec<u8> {
        cmd(RQU, 0xA0, &[])
    }

    pub fn sha1_update(data: &[u8]) -> Vec<u8> {
        let mut b = (data.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(data);
        cmd(RQU, 0xA1, &b)
    }

    pub fn sha1_complete() -> Vec<u8> {
        cmd(RQU, 0xA2, &0u32.to_be_bytes())
    }
}

fn tail(n: usize) -> impl Fn(&[u8]) -> Option<&[u8]> {
    move |r: &[u8]| r.get(HEADER_SIZE..HEADER_SIZE + n)
}

fn check_tpm2(r: &mut Run<'_>) {
    r.rc("startup_rc", 0, &tpm2::startup_clear());
    r.value("getrandom_l0", 0, &tpm2::get_random(16), |x| x.get(12..28));
    r.value("getrandom_l2", 2, &tpm2::get_random(16), |x| x.get(12..28));
    r.value("pcr16_before", 0, &tpm2::pcr_read(16), tpm2::pcr_value);
    r.rc("pcr16_extend_l0_rc", 0, &tpm2::pcr_extend(16, &[EXTEND_DIGEST_BYTE; 32]));
    r.value("pcr16_after_l0", 0, &tpm2::pcr_read(16), tpm2::pcr_value);
    r.rc("pcr16_extend_l2_rc", 2, &tpm2::pcr_extend(16, &[EXTEND_DIGEST_BYTE_L2; 32]));
    r.value("pcr16_after_l2", 2, &tpm2::pcr_read(16), tpm2::pcr_value);
    // PCR 20 may be reset from locality 2 only (PC Client): extend it there, fail to reset it
    // from locality 0, reset it from locality 2.
    r.value("pcr20_before", 0, &tpm2::pcr_read(20), tpm2::pcr_value);
    r.rc("pcr20_extend_l2_rc", 2, &tpm2::pcr_extend(20, &[EXTEND_DIGEST_BYTE_L2; 32]));
    r.rc("pcr20_reset_l0_rc", 0, &tpm2::pcr_reset(20));
    r.value("pcr20_after_refused_reset", 0, &tpm2::pcr_read(20), tpm2::pcr_value);
    r.rc("pcr20_reset_l2_rc", 2, &tpm2::pcr_reset(20));
    r.value("pcr20_after_reset", 0, &tpm2::pcr_read(20), tpm2::pcr_value);
    r.value("hash1024", 0, &tpm2::hash(&pattern(1024)), |x| x.get(12..44));
    let big = tpm2::padded_get_random(BIG_COMMAND);
    r.put("big_command_size", big.len().to_string());
    r.rc("big_command_rc", 0, &big);
    r.value("getrandom_after_big", 0, &tpm2::get_random(16), |x| x.get(12..28));
}

fn check_tpm12(r: &mut Run<'_>) {
    r.rc("startup_rc", 0, &tpm12::startup_clear());
    // What the TPM reports of its timing, in µs, for comparison with what the driver uses.
    use crate::command::probe;
    for (k, sub) in
        [("reported_timeouts_us", probe::TPM12_PROP_TIS_TIMEOUT), ("reported_durations_us", probe::TPM12_PROP_DURATION)]
    {
        if let Some(rsp) = r.send(k, 0, &probe::tpm12_get_property(sub)) {
            let n = if sub == probe::TPM12_PROP_TIS_TIMEOUT { 4 } else { 3 };
            let vals: Vec<String> = (0..n).filter_map(|i| be32(&rsp, 14 + 4 * i)).map(|v| v.to_string()).collect();
            r.put(k, vals.join(","));
        }
    }
    r.value("getrandom_l0", 0, &tpm12::get_random(16), |x| x.get(14..30));
    r.value("pcr16_before", 0, &tpm12::pcr_read(16), tail(20));
    r.value("pcr16_extend_l0", 0, &tpm12::extend(16, &[EXTEND_DIGEST_BYTE; 20]), tail(20));
    r.value("pcr16_after_l0", 0, &tpm12::pcr_read(16), tail(20));
    r.value("pcr16_extend_l2", 2, &tpm12::extend(16, &[EXTEND_DIGEST_BYTE_L2; 20]), tail(20));
    r.value("pcr16_after_l2", 2, &tpm12::pcr_read(16), tail(20));
    // PCR 21 may be extended and reset from locality 2 only (PC Client): extend it there, fail
    // to reset it from locality 0, reset it from locality 2.
    r.value("pcr21_before", 0, &tpm12::pcr_read(21), tail(20));
    r.value("pcr21_extend_l2", 2, &tpm12::extend(21, &[EXTEND_DIGEST_BYTE_L2; 20]), tail(20));
    r.rc("pcr21_reset_l0_rc", 0, &tpm12::pcr_reset(21));
    r.value("pcr21_after_refused_reset", 0, &tpm12::pcr_read(21), tail(20));
    r.rc("pcr21_reset_l2_rc", 2, &tpm12::pcr_reset(21));
    r.value("pcr21_after_reset", 0, &tpm12::pcr_read(21), tail(20));
    if let Some(max) = r.value("sha1_start", 0, &tpm12::sha1_start(), tail(4)) {
        r.put("sha1_max_bytes", be32(&max, 0).unwrap_or_default().to_string());
        let update = tpm12::sha1_update(&pattern(BIG_COMMAND));
        r.put("big_command_size", update.len().to_string());
        r.rc("big_command_rc", 0, &update);
        r.value("sha1_3072", 0, &tpm12::sha1_complete(), tail(20));
    }
}

/// Runs the checks; a transport error is recorded as the value `error: ...` and the checks
/// go on.
pub fn run(tpm: &mut dyn HwTpm) -> Vec<(String, String)> {
    let family = tpm.family();
    let mut r = Run { tpm, out: Vec::new() };
    r.put("family", family.to_string());
    match family {
        Family::Tpm20 => check_tpm2(&mut r),
        Family::Tpm12 => check_tpm12(&mut r),
    }
    r.out
}
