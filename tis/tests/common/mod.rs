//! Checks the results of `selftest::run` by recomputing every digest on the host.

use sha1::Sha1;
use sha2::{Digest, Sha256};
use xvtpm_tis::selftest::{hex, pattern, BIG_COMMAND, EXTEND_DIGEST_BYTE, EXTEND_DIGEST_BYTE_L2};
use xvtpm_tis::Family;

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

fn extend<D: Digest>(old: &str, byte: u8, n: usize) -> Option<String> {
    let old = unhex(old)?;
    Some(hex(&D::new().chain_update(old).chain_update(vec![byte; n]).finalize()))
}

/// What the TPM must be able to do.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// The family.
    pub family: Family,
    /// Whether localities other than 0 are available (QEMU's CRB has only 0).
    pub localities: bool,
}

/// Every problem with the reported values; empty when all match.
pub fn verify(kv: &[(String, String)], want: Expect) -> Vec<String> {
    let get = |k: &str| kv.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str()).unwrap_or("<missing>");
    let mut bad = Vec::new();
    let mut is = |k: &str, ok: bool, why: &str| {
        if !ok {
            bad.push(format!("{k}={} ({why})", get(k)));
        }
    };
    let is_hex = |v: &str, n: usize| v.len() == 2 * n && unhex(v).is_some();
    // Random bytes: the right length and not one byte repeated (all-ones is what a broken
    // read of the device gives).
    let is_random = |v: &str, n: usize| is_hex(v, n) && unhex(v).is_some_and(|b| b.iter().any(|&x| x != b[0]));
    is("family", get("family") == want.family.to_string(), "family");
    match want.family {
        Family::Tpm20 => {
            is("startup_rc", ["0x0", "0x100"].contains(&get("startup_rc")), "started, now or by firmware");
            is("getrandom_l0", is_random(get("getrandom_l0"), 16), "16 random bytes");
            let before = get("pcr16_before");
            is("pcr16_before", is_hex(before, 32), "a SHA-256 PCR");
            is("pcr16_extend_l0_rc", get("pcr16_extend_l0_rc") == "0x0", "extend succeeds");
            let after = get("pcr16_after_l0");
            is(
                "pcr16_after_l0",
                extend::<Sha256>(before, EXTEND_DIGEST_BYTE, 32).as_deref() == Some(after),
                "H(old||d)",
            );
            // TPM_RC_LOCALITY, which libtpms reports against the session (0x800) of handle 1 (0x100).
            is("pcr20_reset_l0_rc", ["0x107", "0x907"].contains(&get("pcr20_reset_l0_rc")), "TPM_RC_LOCALITY");
            if want.localities {
                is("getrandom_l2", is_random(get("getrandom_l2"), 16), "16 random bytes at locality 2");
                is("getrandom_l2", get("getrandom_l2") != get("getrandom_l0"), "fresh random bytes");
                is("pcr16_extend_l2_rc", get("pcr16_extend_l2_rc") == "0x0", "extend at locality 2");
                let l2 = extend::<Sha256>(after, EXTEND_DIGEST_BYTE_L2, 32);
                is("pcr16_after_l2", l2.as_deref() == Some(get("pcr16_after_l2")), "H(old||d) at locality 2");
                is("pcr20_extend_l2_rc", get("pcr20_extend_l2_rc") == "0x0", "extend at locality 2");
                let ext = extend::<Sha256>(get("pcr20_before"), EXTEND_DIGEST_BYTE_L2, 32);
                is("pcr20_after_refused_reset", ext.as_deref() == Some(get("pcr20_after_refused_reset")), "kept");
                is("pcr20_reset_l2_rc", get("pcr20_reset_l2_rc") == "0x0", "reset allowed at locality 2");
                is("pcr20_after_reset", get("pcr20_after_reset") == "00".repeat(32), "reset to zero");
            } else {
                is("getrandom_l2", get("getrandom_l2").contains("locality 0 only"), "locality 2 refused at once");
            }
            is("hash1024", get("hash1024") == hex(&Sha256::digest(pattern(1024))), "SHA-256 of the pattern");
            is("big_command_size", get("big_command_size").parse::<usize>().is_ok_and(|n| n >= BIG_COMMAND), "3 KiB");
            is("big_command_rc", get("big_command_rc") == "0x95", "TPM_RC_SIZE: all bytes arrived, trailing");
            is("getrandom_after_big", is_random(get("getrandom_after_big"), 16), "TPM fine after it");
        }
        Family::Tpm12 => {
            is("startup_rc", ["0x0", "0x26"].contains(&get("startup_rc")), "started, now or by firmware");
            is("getrandom_l0", is_random(get("getrandom_l0"), 16), "16 random bytes");
            let before = get("pcr16_before");
            is("pcr16_before", is_hex(before, 20), "a SHA-1 PCR");
            let l0 = extend::<Sha1>(before, EXTEND_DIGEST_BYTE, 20);
            is("pcr16_extend_l0", l0.as_deref() == Some(get("pcr16_extend_l0")), "H(old||d)");
            is("pcr16_after_l0", l0.as_deref() == Some(get("pcr16_after_l0")), "read back");
            let l2 = extend::<Sha1>(get("pcr16_after_l0"), EXTEND_DIGEST_BYTE_L2, 20);
            is("pcr16_extend_l2", l2.as_deref() == Some(get("pcr16_extend_l2")), "H(old||d) at locality 2");
            is("pcr16_after_l2", l2.as_deref() == Some(get("pcr16_after_l2")), "read back at locality 2");
            // PCRs 17-22 start at all ones and return to it on a reset without a trusted OS.
            is("pcr21_before", get("pcr21_before") == "ff".repeat(20), "all ones");
            let ext = extend::<Sha1>(get("pcr21_before"), EXTEND_DIGEST_BYTE_L2, 20);
            is("pcr21_extend_l2", ext.as_deref() == Some(get("pcr21_extend_l2")), "H(old||d) at locality 2");
            is("pcr21_reset_l0_rc", get("pcr21_reset_l0_rc") == "0x33", "TPM_NOTLOCAL at locality 0");
            is("pcr21_after_refused_reset", ext.as_deref() == Some(get("pcr21_after_refused_reset")), "kept");
            is("pcr21_reset_l2_rc", get("pcr21_reset_l2_rc") == "0x0", "reset allowed at locality 2");
            is("pcr21_after_reset", get("pcr21_after_reset") == "ff".repeat(20), "back to all ones");
            is("sha1_max_bytes", get("sha1_max_bytes").parse::<usize>().is_ok_and(|n| n >= BIG_COMMAND), "room");
            is("big_command_size", get("big_command_size").parse::<usize>().is_ok_and(|n| n >= BIG_COMMAND), "3 KiB");
            is("big_command_rc", get("big_command_rc") == "0x0", "SHA1Update of 3072 bytes");
            is("sha1_3072", get("sha1_3072") == hex(&Sha1::digest(pattern(BIG_COMMAND))), "SHA-1 of the pattern");
        }
    }
    bad
}
