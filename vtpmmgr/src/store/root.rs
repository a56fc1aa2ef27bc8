//! The two root slots (blocks 0 and 1). Each names the tree's root node and the hardware
//! counter value it was written under, and is authenticated with the root key. Commits
//! alternate between the slots, so a crash while writing one leaves the other valid.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;

use super::dev::BLOCK;
use super::node::{NONCE, TAG};

const MAGIC: &[u8; 8] = b"XVTPMMGR";
/// Version 2: roots and nodes are authenticated with the root key's AEAD sub-key. Version 1
/// (still read): with the root key itself.
pub const VERSION: u32 = 2;
/// The first version.
pub const VERSION_1: u32 = 1;
/// Where the nonce sits; everything before it is authenticated.
const NONCE_AT: usize = BLOCK - NONCE - TAG;

/// A root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Root {
    /// Incremented by every commit; the newer slot has the larger one.
    pub seq: u64,
    /// The hardware counter value this root was committed under.
    pub counter: u64,
    /// The root node's block (0: empty tree).
    pub node: u64,
    /// The root node's tag.
    pub tag: [u8; TAG],
    /// Tree depth (0: empty, 1: the root is a leaf).
    pub depth: u8,
    /// Number of records.
    pub count: u64,
    /// First block never used.
    pub high_water: u64,
    /// SHA-256 of the sealed-key block.
    pub sealed_digest: [u8; 32],
    /// The store's format ([`VERSION`] or [`VERSION_1`]).
    pub version: u32,
}

impl Root {
    /// The slot this root is written to.
    pub fn slot(&self) -> u64 {
        self.seq % 2
    }

    /// Encodes and authenticates the root.
    pub fn seal(&self, key: &[u8; 32]) -> [u8; BLOCK] {
        let mut b = [0u8; BLOCK];
        b[..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..20].copy_from_slice(&self.seq.to_le_bytes());
        b[20..28].copy_from_slice(&self.counter.to_le_bytes());
        b[28..36].copy_from_slice(&self.node.to_le_bytes());
        b[36..52].copy_from_slice(&self.tag);
        b[52] = self.depth;
        b[53..61].copy_from_slice(&self.count.to_le_bytes());
        b[61..69].copy_from_slice(&self.high_water.to_le_bytes());
        b[69..101].copy_from_slice(&self.sealed_digest);
        rand::thread_rng().fill_bytes(&mut b[NONCE_AT..NONCE_AT + NONCE]);
        let cipher = Aes256Gcm::new(key.into());
        // An empty message: GCM only authenticates the slot.
        let tag = cipher
            .encrypt(Nonce::from_slice(&b[NONCE_AT..NONCE_AT + NONCE]), Payload { msg: &[], aad: &b[..NONCE_AT] })
            .unwrap_or_default();
        b[BLOCK - TAG..].copy_from_slice(&tag[..TAG.min(tag.len())]);
        b
    }

    /// Checks and decodes a slot: `Ok(None)` for a slot never written (no magic).
    pub fn open(key: &[u8; 32], b: &[u8; BLOCK]) -> Result<Option<Root>, String> {
        if &b[..8] != MAGIC {
            return if b.iter().all(|&x| x == 0) { Ok(None) } else { Err("has no root magic".into()) };
        }
        let cipher = Aes256Gcm::new(key.into());
        cipher
            .decrypt(
                Nonce::from_slice(&b[NONCE_AT..NONCE_AT + NONCE]),
                Payload { msg: &b[BLOCK - TAG..], aad: &b[..NONCE_AT] },
            )
            .map_err(|_| "does not authenticate (damaged, or another root key)".to_string())?;
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default());
        let version = u32::from_le_bytes(b[8..12].try_into().unwrap_or_default());
        if version != VERSION && version != VERSION_1 {
            return Err(format!("has version {version}, this manager knows {VERSION_1} and {VERSION}"));
        }
        let mut r = Root {
            seq: u64_at(12),
            counter: u64_at(20),
            node: u64_at(28),
            depth: b[52],
            count: u64_at(53),
            high_water: u64_at(61),
            version,
            ..Root::default()
        };
        r.tag.copy_from_slice(&b[36..52]);
        r.sealed_digest.copy_from_slice(&b[69..101]);
        Ok(Some(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_every_byte_is_authenticated() {
        let key = [3u8; 32];
        let r = Root {
            seq: 5,
            counter: 9,
            node: 12,
            tag: [1; 16],
            depth: 2,
            count: 40,
            high_water: 20,
            sealed_digest: [4; 32],
            version: VERSION,
        };
        let b = r.seal(&key);
        assert_eq!(Root::open(&key, &b).expect("valid"), Some(r));
        assert_eq!(Root::open(&key, &[0; BLOCK]).expect("empty"), None);
        assert!(Root::open(&[2; 32], &b).is_err());
        for at in (0..BLOCK).step_by(97).chain([BLOCK - 1, 100, 3000]) {
            let mut bad = b;
            bad[at] ^= 0x80;
            assert!(!matches!(Root::open(&key, &bad), Ok(Some(_))), "flip at {at} undetected");
        }
    }
}
