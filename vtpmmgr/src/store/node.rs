//! Tree nodes: their plaintext layout, and their encryption into one block (AES-256-GCM, a
//! fresh nonce per write, the block number in the associated data). The parent keeps each
//! child's tag, so a node is pinned to the exact version its parent wrote.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;

use super::dev::BLOCK;
use super::record::{Record, RECORD_LEN};

/// Nonce length.
pub const NONCE: usize = 12;
/// Tag length.
pub const TAG: usize = 16;
/// Plaintext bytes in a block.
pub const PLAIN: usize = BLOCK - NONCE - TAG;
const HEADER: usize = 4;
/// Records per leaf.
pub const LEAF_CAP: usize = (PLAIN - HEADER) / RECORD_LEN;
/// Length of an internal entry: first key, child block, child tag.
const ENTRY_LEN: usize = 16 + 8 + TAG;
/// Children per internal node.
pub const FANOUT: usize = (PLAIN - HEADER) / ENTRY_LEN;

const KIND_LEAF: u8 = 1;
const KIND_INTERNAL: u8 = 2;

/// A child pointer: the smallest key below it, its block and the tag it was written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Child {
    /// Smallest uuid in the child's subtree (the first child's is all zeros).
    pub key: [u8; 16],
    /// Block number.
    pub block: u64,
    /// The child's GCM tag.
    pub tag: [u8; TAG],
}

/// A decrypted node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// Records sorted by uuid.
    Leaf(Vec<Record>),
    /// Children sorted by key.
    Internal(Vec<Child>),
}

impl Node {
    /// The plaintext of the node's block.
    pub fn encode(&self) -> [u8; PLAIN] {
        let mut p = [0u8; PLAIN];
        match self {
            Node::Leaf(recs) => {
                p[0] = KIND_LEAF;
                p[2..4].copy_from_slice(&(recs.len() as u16).to_le_bytes());
                for (i, r) in recs.iter().enumerate() {
                    let at = HEADER + i * RECORD_LEN;
                    p[at..at + RECORD_LEN].copy_from_slice(&r.encode());
                }
            }
            Node::Internal(kids) => {
                p[0] = KIND_INTERNAL;
                p[2..4].copy_from_slice(&(kids.len() as u16).to_le_bytes());
                for (i, c) in kids.iter().enumerate() {
                    let at = HEADER + i * ENTRY_LEN;
                    p[at..at + 16].copy_from_slice(&c.key);
                    p[at + 16..at + 24].copy_from_slice(&c.block.to_le_bytes());
                    p[at + 24..at + ENTRY_LEN].copy_from_slice(&c.tag);
                }
            }
        }
        p
    }

    /// Parses the plaintext of a block, as [`open`] does after decrypting it (the fuzz
    /// targets' entry point).
    pub fn decode_plain(p: &[u8; PLAIN]) -> Result<Node, String> {
        Node::decode(p)
    }

    fn decode(p: &[u8]) -> Result<Node, String> {
        let count = u16::from_le_bytes([p[2], p[3]]) as usize;
        match p[0] {
            KIND_LEAF if count <= LEAF_CAP => Ok(Node::Leaf(
                (0..count)
                    .map(|i| Record::decode(&p[HEADER + i * RECORD_LEN..HEADER + (i + 1) * RECORD_LEN]))
                    .collect(),
            )),
            KIND_INTERNAL if (1..=FANOUT).contains(&count) => Ok(Node::Internal(
                (0..count)
                    .map(|i| {
                        let at = HEADER + i * ENTRY_LEN;
                        let mut key = [0u8; 16];
                        key.copy_from_slice(&p[at..at + 16]);
                        let mut block = [0u8; 8];
                        block.copy_from_slice(&p[at + 16..at + 24]);
                        let mut tag = [0u8; TAG];
                        tag.copy_from_slice(&p[at + 24..at + ENTRY_LEN]);
                        Child { key, block: u64::from_le_bytes(block), tag }
                    })
                    .collect(),
            )),
            k => Err(format!("node kind {k} with {count} entries")),
        }
    }
}

fn aad(block: u64) -> [u8; 29] {
    let mut a = [0u8; 29];
    a[..21].copy_from_slice(b"xvtpm-vtpmmgr-node-v1");
    a[21..].copy_from_slice(&block.to_le_bytes());
    a
}

/// Encrypts `node` for block `n`: the block's bytes and its tag.
pub fn seal(key: &[u8; 32], n: u64, node: &Node) -> ([u8; BLOCK], [u8; TAG]) {
    let mut out = [0u8; BLOCK];
    rand::thread_rng().fill_bytes(&mut out[..NONCE]);
    let cipher = Aes256Gcm::new(key.into());
    let plain = node.encode();
    let aad = aad(n);
    // Encryption of a fixed-size buffer with a valid key and nonce cannot fail.
    let ct = cipher
        .encrypt(Nonce::from_slice(&out[..NONCE]), Payload { msg: &plain, aad: &aad })
        .unwrap_or_else(|_| vec![0; PLAIN + TAG]);
    out[NONCE..].copy_from_slice(&ct);
    let mut tag = [0u8; TAG];
    tag.copy_from_slice(&out[BLOCK - TAG..]);
    (out, tag)
}

/// Decrypts block `n`, which its parent says was written with `tag`.
pub fn open(key: &[u8; 32], n: u64, block: &[u8; BLOCK], tag: &[u8; TAG]) -> Result<Node, String> {
    if &block[BLOCK - TAG..] != tag {
        return Err("is not the version its parent wrote (tag mismatch: old or foreign block)".into());
    }
    let cipher = Aes256Gcm::new(key.into());
    let plain = cipher
        .decrypt(Nonce::from_slice(&block[..NONCE]), Payload { msg: &block[NONCE..], aad: &aad(n) })
        .map_err(|_| "does not authenticate".to_string())?;
    Node::decode(&plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacities() {
        assert_eq!(LEAF_CAP, 33);
        assert_eq!(FANOUT, 101);
    }

    #[test]
    fn seal_open_and_tamper() {
        let key = [7u8; 32];
        let recs: Vec<Record> = (0..LEAF_CAP as u8).map(|i| Record::new([i; 16], 1)).collect();
        let node = Node::Leaf(recs);
        let (blk, tag) = seal(&key, 9, &node);
        assert_eq!(open(&key, 9, &blk, &tag).expect("opens"), node);
        assert!(open(&key, 10, &blk, &tag).is_err(), "moved to another block");
        assert!(open(&[8u8; 32], 9, &blk, &tag).is_err(), "another key");
        for at in [0, 12, 500, BLOCK - 17, BLOCK - 1] {
            let mut bad = blk;
            bad[at] ^= 0x01;
            assert!(open(&key, 9, &bad, &tag).is_err(), "flip at {at}");
        }
        let (_, other) = seal(&key, 9, &node);
        assert!(open(&key, 9, &blk, &other).is_err(), "an older version");
    }
}
