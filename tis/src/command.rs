//! The little the driver needs to know about TPM commands and responses: header fields and
//! the size checks.

use crate::{Error, Result};

pub use xvtpm_proto::tpm::HEADER_SIZE;

pub use xvtpm_proto::tpm::be32;

/// Checks a command before it is sent: at least a header, its size field equal to its length,
/// and no larger than `max`. Returns the ordinal.
pub fn check_command(command: &[u8], max: usize) -> Result<u32> {
    let size = command.len();
    if size < HEADER_SIZE {
        return Err(Error::BadCommand { size, why: "shorter than a TPM header" });
    }
    if be32(command, 2) != u32::try_from(size).ok() {
        return Err(Error::BadCommand { size, why: "its header's size field differs from its length" });
    }
    if size > max {
        return Err(Error::BadCommand { size, why: "larger than the TPM's buffer" });
    }
    Ok(be32(command, 6).unwrap_or_default())
}

/// The total size a response header claims, checked against a header's size and `max`.
pub fn response_size(header: &[u8], max: usize) -> Result<usize> {
    let claimed = be32(header, 2).ok_or(Error::ResponseShort { got: header.len(), claimed: HEADER_SIZE })?;
    match usize::try_from(claimed) {
        Ok(n) if (HEADER_SIZE..=max).contains(&n) => Ok(n),
        _ => Err(Error::ResponseSize { claimed: u64::from(claimed), min: HEADER_SIZE, max }),
    }
}

/// The response code of a response.
pub fn response_code(response: &[u8]) -> u32 {
    be32(response, 6).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_checked() {
        let ok = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8];
        assert_eq!(check_command(&ok, 4096).expect("valid"), 0x17b);
        assert!(matches!(check_command(&ok[..9], 4096), Err(Error::BadCommand { .. })));
        let mut lie = ok;
        lie[5] = 13;
        assert!(matches!(check_command(&lie, 4096), Err(Error::BadCommand { .. })));
        assert!(matches!(check_command(&ok, 11), Err(Error::BadCommand { .. })));
    }

    #[test]
    fn response_sizes_are_bounded() {
        assert_eq!(response_size(&[0x80, 1, 0, 0, 0, 10, 0, 0, 0, 0], 4096).expect("ok"), 10);
        for claimed in [0u32, 9, 4097, u32::MAX] {
            let mut h = [0x80, 1, 0, 0, 0, 0, 0, 0, 0, 0];
            h[2..6].copy_from_slice(&claimed.to_be_bytes());
            assert!(matches!(response_size(&h, 4096), Err(Error::ResponseSize { .. })), "{claimed}");
        }
    }
}

/// Builders and parsers for the few commands the driver sends itself (probing the family,
/// reading TPM 1.2 timing and buffer sizes).
pub mod probe {
    use super::be32;

    /// TPM2_GetCapability(TPM_CAP_TPM_PROPERTIES, first, count).
    pub fn tpm2_get_properties(first: u32, count: u32) -> Vec<u8> {
        let mut c = vec![0x80, 0x01, 0, 0, 0, 22, 0, 0, 0x01, 0x7A];
        for v in [6u32, first, count] {
            c.extend_from_slice(&v.to_be_bytes());
        }
        c
    }

    /// The (property, value) pairs of a successful TPM2_GetCapability(TPM_CAP_TPM_PROPERTIES)
    /// response; `None` for anything else.
    pub fn parse_tpm2_properties(rsp: &[u8]) -> Option<Vec<(u32, u32)>> {
        if rsp.get(..2)? != [0x80, 0x01] || be32(rsp, 6)? != 0 || be32(rsp, 11)? != 6 {
            return None;
        }
        let count = usize::try_from(be32(rsp, 15)?).ok()?;
        let body = rsp.get(19..)?;
        if count > body.len() / 8 {
            return None;
        }
        Some((0..count).filter_map(|i| Some((be32(body, i * 8)?, be32(body, i * 8 + 4)?))).collect())
    }

    /// Whether a response is a TPM 2.0 one (its tag is TPM_ST_NO_SESSIONS or TPM_ST_SESSIONS),
    /// whatever its code: how a TPM 2.0 is told from a TPM 1.2.
    pub fn is_tpm2_response(rsp: &[u8]) -> bool {
        matches!(rsp.get(..2), Some([0x80, 0x01] | [0x80, 0x02]))
    }

    /// TPM_GetCapability(TPM_CAP_PROPERTY, sub) of TPM 1.2.
    pub fn tpm12_get_property(sub: u32) -> Vec<u8> {
        let mut c = vec![0x00, 0xC1, 0, 0, 0, 22, 0, 0, 0, 0x65];
        for v in [5u32, 4, sub] {
            c.extend_from_slice(&v.to_be_bytes());
        }
        c
    }

    /// The `N` u32 values of a successful TPM 1.2 TPM_GetCapability response.
    pub fn parse_tpm12_u32s<const N: usize>(rsp: &[u8]) -> Option<[u32; N]> {
        if rsp.get(..2)? != [0x00, 0xC4] || be32(rsp, 6)? != 0 {
            return None;
        }
        let len = usize::try_from(be32(rsp, 10)?).ok()?;
        if len < N * 4 || rsp.len() < 14 + N * 4 {
            return None;
        }
        let mut out = [0u32; N];
        for (i, v) in out.iter_mut().enumerate() {
            *v = be32(rsp, 14 + i * 4)?;
        }
        Some(out)
    }

    /// TPM_CAP_PROP_TIS_TIMEOUT.
    pub const TPM12_PROP_TIS_TIMEOUT: u32 = 0x115;
    /// TPM_CAP_PROP_DURATION.
    pub const TPM12_PROP_DURATION: u32 = 0x120;
    /// TPM_CAP_PROP_INPUT_BUFFER.
    pub const TPM12_PROP_INPUT_BUFFER: u32 = 0x124;
    /// TPM_PT_MAX_COMMAND_SIZE (TPM_PT_MAX_RESPONSE_SIZE follows it).
    pub const TPM2_PT_MAX_COMMAND_SIZE: u32 = 0x11E;
}
