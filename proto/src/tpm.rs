//! TPM command and response basics, for TPM 2.0 and TPM 1.2: both start with the same
//! 10-byte big-endian header (`tag u16 | size u32 | code u32`), where the code is the command
//! code of a command and the response code of a response. The vTPM manager's protocol uses
//! the same framing ([`crate::mgr`]).

use crate::Error;

/// Size of a command or response header.
pub const HEADER_SIZE: usize = 10;

/// TPM 2.0 `TPM_ST_NO_SESSIONS`.
pub const TPM_ST_NO_SESSIONS: u16 = 0x8001;
/// TPM 2.0 `TPM_ST_SESSIONS`.
pub const TPM_ST_SESSIONS: u16 = 0x8002;
/// TPM 1.2 `TPM_TAG_RQU_COMMAND`.
pub const TPM_TAG_RQU_COMMAND: u16 = 0x00C1;
/// TPM 1.2 `TPM_TAG_RSP_COMMAND`.
pub const TPM_TAG_RSP_COMMAND: u16 = 0x00C4;

/// TPM 2.0 command codes used across the crates.
pub mod cc {
    /// `TPM2_Startup`.
    pub const STARTUP: u32 = 0x144;
    /// `TPM2_Shutdown`.
    pub const SHUTDOWN: u32 = 0x145;
    /// `TPM2_GetRandom`.
    pub const GET_RANDOM: u32 = 0x17B;
    /// `TPM2_GetCapability`.
    pub const GET_CAPABILITY: u32 = 0x17A;
}

/// TPM 1.2 ordinals used across the crates.
pub mod ord {
    /// `TPM_ORD_Startup`.
    pub const STARTUP: u32 = 0x99;
    /// `TPM_ORD_SaveState`.
    pub const SAVE_STATE: u32 = 0x98;
    /// `TPM_ORD_GetRandom`.
    pub const GET_RANDOM: u32 = 0x46;
}

/// Response codes used across the crates.
pub mod rc {
    /// Success, both families.
    pub const SUCCESS: u32 = 0;
    /// TPM 2.0 `TPM_RC_FAILURE`.
    pub const TPM2_FAILURE: u32 = 0x101;
    /// TPM 2.0 `TPM_RC_INITIALIZE`: Startup already done.
    pub const TPM2_INITIALIZE: u32 = 0x100;
    /// TPM 1.2 `TPM_FAIL`.
    pub const TPM_FAIL: u32 = 0x09;
    /// TPM 1.2 `TPM_FAILEDSELFTEST`: the TPM is in failure mode.
    pub const TPM_FAILEDSELFTEST: u32 = 0x1C;
    /// TPM 1.2 `TPM_INVALID_POSTINIT`: Startup already done.
    pub const TPM_INVALID_POSTINIT: u32 = 0x26;
}

/// A TPM family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// TPM 1.2.
    Tpm12,
    /// TPM 2.0.
    Tpm20,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Tpm12 => "1.2",
            Family::Tpm20 => "2.0",
        })
    }
}

impl Family {
    /// The tag of a command without sessions.
    pub fn command_tag(self) -> u16 {
        match self {
            Family::Tpm20 => TPM_ST_NO_SESSIONS,
            Family::Tpm12 => TPM_TAG_RQU_COMMAND,
        }
    }

    /// The tag of an error response (TPM 2.0 answers errors without sessions).
    pub fn response_tag(self) -> u16 {
        match self {
            Family::Tpm20 => TPM_ST_NO_SESSIONS,
            Family::Tpm12 => TPM_TAG_RSP_COMMAND,
        }
    }

    /// The generic failure code.
    pub fn failure_rc(self) -> u32 {
        match self {
            Family::Tpm20 => rc::TPM2_FAILURE,
            Family::Tpm12 => rc::TPM_FAIL,
        }
    }
}

/// The big-endian `u16` at `at`, if there.
pub fn be16(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at.checked_add(2)?).and_then(|s| s.try_into().ok()).map(u16::from_be_bytes)
}

/// The big-endian `u32` at `at`, if there.
pub fn be32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at.checked_add(4)?).and_then(|s| s.try_into().ok()).map(u32::from_be_bytes)
}

/// The big-endian `u64` at `at`, if there.
pub fn be64(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at.checked_add(8)?).and_then(|s| s.try_into().ok()).map(u64::from_be_bytes)
}

/// A cursor over big-endian fields; every read is bounds-checked and `None` past the end.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    /// Reads `buf` from its start.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, at: 0 }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.buf.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N).and_then(|s| s.try_into().ok())
    }

    /// The next byte.
    pub fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    /// The next big-endian `u16`.
    pub fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    /// The next big-endian `u32`.
    pub fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    /// The next big-endian `u64`.
    pub fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    /// A `u16`-size-prefixed buffer (TPM2B).
    pub fn sized16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.bytes(usize::from(n))
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        let s = self.buf.get(self.at..).unwrap_or_default();
        self.at = self.buf.len();
        s
    }

    /// How many bytes are left.
    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.at)
    }
}

/// The header of a command or response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Tag.
    pub tag: u16,
    /// Size of the whole message, header included.
    pub size: u32,
    /// Command code, ordinal or response code.
    pub code: u32,
}

impl Header {
    /// The header at the start of `b`, if there are 10 bytes (its size is not checked).
    pub fn peek(b: &[u8]) -> Option<Self> {
        let mut r = Reader::new(b);
        Some(Self { tag: r.u16()?, size: r.u32()?, code: r.u32()? })
    }

    /// The header of the whole message `msg`, whose size field must be its length.
    pub fn of(msg: &[u8]) -> Result<Self, Error> {
        let h = Self::peek(msg).ok_or(Error::Short { what: "TPM header", got: msg.len(), need: HEADER_SIZE })?;
        if h.size as usize != msg.len() {
            return Err(Error::Size { claimed: h.size, len: msg.len() });
        }
        Ok(h)
    }

    /// The 10 bytes.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[..2].copy_from_slice(&self.tag.to_be_bytes());
        b[2..6].copy_from_slice(&self.size.to_be_bytes());
        b[6..].copy_from_slice(&self.code.to_be_bytes());
        b
    }
}

/// A whole message: the header with its size, then `body`.
pub fn frame(tag: u16, code: u32, body: &[u8]) -> Vec<u8> {
    let size = u32::try_from(HEADER_SIZE + body.len()).unwrap_or(u32::MAX);
    let mut m = Vec::with_capacity(HEADER_SIZE + body.len());
    m.extend_from_slice(&Header { tag, size, code }.encode());
    m.extend_from_slice(body);
    m
}

/// The command or response code of `msg` (`None`: shorter than a header).
pub fn code(msg: &[u8]) -> Option<u32> {
    be32(msg, 6)
}

/// How Startup is to start the TPM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartupType {
    /// TPM2_Startup(CLEAR) / TPM_Startup(ST_CLEAR).
    Clear,
    /// TPM2_Startup(STATE) / TPM_Startup(ST_STATE).
    State,
    /// TPM_Startup(ST_DEACTIVATED); TPM 1.2 only.
    Deactivated,
}

/// The Startup command of `family` (`None`: TPM 2.0 has no deactivated startup).
pub fn startup(family: Family, ty: StartupType) -> Option<Vec<u8>> {
    let (code, arg): (u32, u16) = match (family, ty) {
        (Family::Tpm20, StartupType::Clear) => (cc::STARTUP, 0),
        (Family::Tpm20, StartupType::State) => (cc::STARTUP, 1),
        (Family::Tpm20, StartupType::Deactivated) => return None,
        (Family::Tpm12, StartupType::Clear) => (ord::STARTUP, 1),
        (Family::Tpm12, StartupType::State) => (ord::STARTUP, 2),
        (Family::Tpm12, StartupType::Deactivated) => (ord::STARTUP, 3),
    };
    Some(frame(family.command_tag(), code, &arg.to_be_bytes()))
}

/// TPM2_Shutdown(STATE) or TPM_SaveState: what a platform sends before it suspends.
pub fn shutdown_state(family: Family) -> Vec<u8> {
    match family {
        Family::Tpm20 => frame(TPM_ST_NO_SESSIONS, cc::SHUTDOWN, &1u16.to_be_bytes()),
        Family::Tpm12 => frame(TPM_TAG_RQU_COMMAND, ord::SAVE_STATE, &[]),
    }
}

/// GetRandom of `n` bytes.
pub fn get_random(family: Family, n: u16) -> Vec<u8> {
    match family {
        Family::Tpm20 => frame(TPM_ST_NO_SESSIONS, cc::GET_RANDOM, &n.to_be_bytes()),
        Family::Tpm12 => frame(TPM_TAG_RQU_COMMAND, ord::GET_RANDOM, &u32::from(n).to_be_bytes()),
    }
}

/// An error response of `family` carrying `rc`: what a client gets when its command cannot
/// run at all.
pub fn error_response(family: Family, rc: u32) -> Vec<u8> {
    frame(family.response_tag(), rc, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_are_byte_exact() {
        assert_eq!(
            startup(Family::Tpm20, StartupType::Clear).expect("2.0"),
            [0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x44, 0, 0]
        );
        assert_eq!(
            startup(Family::Tpm12, StartupType::Clear).expect("1.2"),
            [0x00, 0xc1, 0, 0, 0, 0x0c, 0, 0, 0, 0x99, 0, 0x01]
        );
        assert_eq!(startup(Family::Tpm12, StartupType::Deactivated).expect("1.2")[11], 3);
        assert_eq!(startup(Family::Tpm20, StartupType::Deactivated), None);
        assert_eq!(get_random(Family::Tpm20, 8), [0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 8]);
        assert_eq!(get_random(Family::Tpm12, 8), [0, 0xc1, 0, 0, 0, 0x0e, 0, 0, 0, 0x46, 0, 0, 0, 8]);
        assert_eq!(shutdown_state(Family::Tpm20), [0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x45, 0, 1]);
        assert_eq!(error_response(Family::Tpm12, 9), [0, 0xc4, 0, 0, 0, 10, 0, 0, 0, 9]);
        assert_eq!(error_response(Family::Tpm20, 0x101), [0x80, 0x01, 0, 0, 0, 10, 0, 0, 1, 1]);
    }

    #[test]
    fn headers_check_their_size() {
        let m = frame(0x8001, 0x17b, &[0, 8]);
        assert_eq!(Header::of(&m), Ok(Header { tag: 0x8001, size: 12, code: 0x17b }));
        assert_eq!(Header::of(&m[..11]), Err(Error::Size { claimed: 12, len: 11 }));
        assert!(matches!(Header::of(&m[..9]), Err(Error::Short { .. })));
        assert_eq!(code(&m), Some(0x17b));
        assert_eq!(code(&m[..9]), None);
    }

    #[test]
    fn readers_stop_at_the_end() {
        let mut r = Reader::new(&[0, 2, 0xaa, 0xbb, 1]);
        assert_eq!(r.sized16(), Some(&[0xaa, 0xbb][..]));
        assert_eq!(r.u16(), None);
        assert_eq!(r.u8(), Some(1));
        assert_eq!(r.remaining(), 0);
        assert_eq!(be32(&[1, 2, 3], 0), None);
        assert_eq!(be32(&[1, 2, 3, 4], usize::MAX), None);
        assert_eq!(be64(&[0, 0, 0, 0, 0, 0, 1, 0], 0), Some(256));
    }
}
