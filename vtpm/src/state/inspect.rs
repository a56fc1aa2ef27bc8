//! What an operator may learn from a state file without any key: its format, how it is
//! protected and how large it is. Never its contents.

use sha2::{Digest, Sha256};

/// A state file's outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateFileInfo {
    /// `key-file` (one blob per file, key from a key file) or `managed` (all blobs, key at the
    /// vTPM manager).
    pub format: &'static str,
    /// How it is protected.
    pub protection: &'static str,
    /// Size of the file.
    pub file_bytes: usize,
    /// Size of the protected payload (ciphertext and tag, or data and digest).
    pub payload_bytes: usize,
    /// For managed files: the SHA-256 the manager records for the slot (matching it tells
    /// which slot is current).
    pub sha256: Option<String>,
}

/// Reads a state file's header. `Err` names what is wrong with a file that is not a state
/// file or is truncated.
pub fn inspect(file: &[u8]) -> Result<StateFileInfo, String> {
    match file.get(..8) {
        Some(b"XVTPMST1") => {
            let header = file.get(..28).ok_or("truncated header")?;
            let len = u32::from_le_bytes([header[24], header[25], header[26], header[27]]) as usize;
            if len != file.len() - 28 {
                return Err(format!("length field says {len} bytes, the file holds {}", file.len() - 28));
            }
            let protection = match header[8] {
                1 => "aes-256-gcm",
                2 => "sha-256 integrity only (not encrypted)",
                m => return Err(format!("unknown protection mode {m}")),
            };
            Ok(StateFileInfo {
                format: "key-file",
                protection,
                file_bytes: file.len(),
                payload_bytes: len,
                sha256: None,
            })
        }
        Some(b"XVTPMMS1") => {
            if file.len() < 8 + 12 + 16 {
                return Err("truncated managed state file".into());
            }
            let digest: String = Sha256::digest(file).iter().map(|b| format!("{b:02x}")).collect();
            Ok(StateFileInfo {
                format: "managed",
                protection: "aes-256-gcm, fresh key per save held by the vTPM manager",
                file_bytes: file.len(),
                payload_bytes: file.len() - 20,
                sha256: Some(digest),
            })
        }
        _ => Err("not an xvtpm state file (unknown magic)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::file::{FileStore, StateKey};
    use crate::state::StateStore;

    #[test]
    fn reads_headers_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("xvtpm-inspect-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut s = FileStore::open(&dir, Some(StateKey::from_bytes(&[1; 32]).expect("key"))).expect("store");
        s.store("permall", b"secret-data").expect("store");
        let bytes = std::fs::read(dir.join("permall.xvtpm")).expect("read");
        let info = inspect(&bytes).expect("inspect");
        assert_eq!((info.format, info.protection, info.payload_bytes), ("key-file", "aes-256-gcm", 11 + 16));
        assert!(inspect(&bytes[..20]).is_err());
        assert!(inspect(&bytes[..bytes.len() - 1]).is_err(), "length mismatch");
        assert!(inspect(b"hello world, not a state file").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
