//! Target `state_header`: what the vTPM and the manager parse from their disks.
//!
//! - the vTPM's key-file state files (`vtpm::state::file`: `FileStore::decode_file`, the
//!   parser behind `load`), the operator's `inspect`, and the managed store's slots
//!   (`vtpm::state::managed`: the plaintext blob map, and `ManagedStore::open` on a slot
//!   directory whose file the harness encrypts from the fuzzer's plaintext, so the real
//!   open path reaches the blob parser past AES-GCM);
//! - the manager's store (`vtpmmgr::store`): the sealed-key block, the root slots, tree node
//!   plaintexts.
//!
//! Input: byte 0 picks one of the parsers below (`selector % 8`); the rest is its input.
//!
//! Checked: a state file that loads also inspects, with consistent sizes; every encode is
//! read back by its decoder (and refused under another blob name, by the other kind of store,
//! and with any single bit flipped); the managed blob map re-encodes canonically and
//! `ManagedStore::open` serves exactly the blobs the plaintext holds, or refuses it if it is
//! malformed; the manager's sealed-key block yields exactly the bytes its length names; roots
//! and nodes round-trip through seal and open.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use sha2::{Digest, Sha256};

use xvtpm_proto::mgr::{status, Reply, Request};
use xvtpm_vtpm::state::file::{FileStore, StateKey};
use xvtpm_vtpm::state::inspect::inspect;
use xvtpm_vtpm::state::managed::{self, parse_reply, ManagedStore, ManagerLink};
use xvtpm_vtpm::state::StateStore;
use xvtpm_vtpmmgr::store::dev::{MemDev, BLOCK};
use xvtpm_vtpmmgr::store::node::{self, Node, FANOUT, LEAF_CAP, PLAIN};
use xvtpm_vtpmmgr::store::record::RECORD_LEN;
use xvtpm_vtpmmgr::store::root::Root;
use xvtpm_vtpmmgr::store::{ensure_empty, read_sealed};

/// The key of the keyed stores, the managed slots and the manager's store.
pub const KEY: [u8; 32] = [0x42; 32];
/// Blob names libtpms uses.
pub const NAMES: [&str; 3] = ["permall", "volatilestate", "savestate"];
/// The managed store's slot files and magic.
pub const SLOTS: [&str; 2] = ["managed-a.xvtpm", "managed-b.xvtpm"];
/// The managed store's magic.
pub const MANAGED_MAGIC: &[u8; 8] = b"XVTPMMS1";
const KEY_FILE_HEADER: usize = 28;

struct Dirs {
    keyed: FileStore,
    plain: FileStore,
    managed: PathBuf,
}

/// The stores live in directories of their own under the temporary directory (`TMPDIR`:
/// scripts/fuzz.sh points it at a directory it removes afterwards).
/// One set per thread (libFuzzer runs one; `cargo test` several), made once.
fn dirs() -> &'static Dirs {
    thread_local! {
        static DIRS: &'static Dirs = Box::leak(Box::new(make_dirs()));
    }
    DIRS.with(|d| *d)
}

fn make_dirs() -> Dirs {
    static THREADS: AtomicUsize = AtomicUsize::new(0);
    let n = THREADS.fetch_add(1, Ordering::Relaxed);
    let base = std::env::temp_dir().join(format!("xvtpm-fuzz-state-{}-{n}", std::process::id()));
    let key = StateKey::from_bytes(&KEY).expect("a 32-byte key");
    Dirs {
        keyed: FileStore::open(&base.join("keyed"), Some(key)).expect("keyed store"),
        plain: FileStore::open(&base.join("plain"), None).expect("plain store"),
        managed: base.join("managed"),
    }
}

/// The keyed and the plain key-file store (for the seeds).
pub fn stores() -> (&'static FileStore, &'static FileStore) {
    let d = dirs();
    (&d.keyed, &d.plain)
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((sel, rest)) = crate::selector(data) else { return };
    match sel % 8 {
        0 => key_file(rest),
        1 => key_file_round_trip(rest),
        2 => managed_plaintext(rest),
        3 => managed_open(rest),
        4 => manager_reply(rest),
        5 => sealed_block(rest),
        6 => root_slot(rest),
        _ => tree_node(rest),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A state file: what `load` and `inspect` make of it.
fn key_file(rest: &[u8]) {
    let Some((&n, file)) = rest.split_first() else { return };
    let name = NAMES[usize::from(n) % NAMES.len()];
    let d = dirs();
    let info = inspect(file);
    if let Ok(i) = &info {
        assert_eq!(i.file_bytes, file.len());
        assert!(i.payload_bytes <= i.file_bytes);
        match i.format {
            "key-file" => assert_eq!(i.payload_bytes, file.len() - KEY_FILE_HEADER),
            "managed" => assert_eq!(i.sha256.as_deref(), Some(hex(&Sha256::digest(file)).as_str())),
            other => panic!("format {other}"),
        }
    }
    let keyed = d.keyed.decode_file(name, file);
    let plain = d.plain.decode_file(name, file);
    assert!(keyed.is_err() || plain.is_err(), "one file loads with and without a key");
    for (loaded, overhead) in [(keyed, 16), (plain, 32)] {
        if let Ok(blob) = loaded {
            let i = info.as_ref().expect("a state file that loads inspects");
            assert_eq!((i.format, i.payload_bytes), ("key-file", blob.len() + overhead));
        }
    }
}

/// `encode` then `decode_file`, and the ways the result must be refused.
fn key_file_round_trip(rest: &[u8]) {
    if rest.len() < 3 {
        return;
    }
    let (n, flip, blob) = (usize::from(rest[0]), u16::from_be_bytes([rest[1], rest[2]]), &rest[3..]);
    let (name, other) = (NAMES[n % 3], NAMES[(n + 1) % 3]);
    let d = dirs();
    for (store, wrong_store, overhead) in [(&d.keyed, &d.plain, 16), (&d.plain, &d.keyed, 32)] {
        let file = store.encode(name, blob).expect("encode");
        assert_eq!(file.len(), KEY_FILE_HEADER + blob.len() + overhead);
        assert_eq!(store.decode_file(name, &file).expect("round trip"), blob);
        assert!(store.decode_file(other, &file).is_err(), "loaded under another blob's name");
        assert!(wrong_store.decode_file(name, &file).is_err(), "loaded by the other kind of store");
        let info = inspect(&file).expect("inspect");
        assert_eq!(info.payload_bytes, blob.len() + overhead);
        let mut bad = file.clone();
        let at = usize::from(flip) % bad.len();
        bad[at] ^= 1 << (flip >> 13);
        assert!(store.decode_file(name, &bad).is_err(), "bit {} of byte {at} flipped went unnoticed", flip >> 13);
    }
}

/// The managed slot's plaintext: the blob map.
fn managed_plaintext(b: &[u8]) {
    if let Some(map) = managed::decode(b) {
        let enc = managed::encode(&map);
        assert!(enc.len() <= b.len(), "canonical form longer than the input");
        assert_eq!(managed::decode(&enc).as_ref(), Some(&map), "blob map round trip");
    }
}

/// The manager's side of LOADHASHKEY, answering with one fixed reply.
#[derive(Debug)]
struct FixedLink(u32, Vec<u8>);

impl ManagerLink for FixedLink {
    fn call(&mut self, request: &Request) -> xvtpm_vtpm::Result<(u32, Vec<u8>)> {
        match request {
            Request::LoadHashKey => Ok((self.0, self.1.clone())),
            other => Err(xvtpm_vtpm::Error::Protocol(format!("unexpected {other:?}"))),
        }
    }
}

/// Encrypts a managed slot the way the store writes it.
pub fn managed_slot(plaintext: &[u8], nonce: [u8; 12]) -> Vec<u8> {
    let ct = Aes256Gcm::new((&KEY).into())
        .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad: MANAGED_MAGIC })
        .expect("encryption");
    [&MANAGED_MAGIC[..], &nonce, &ct].concat()
}

/// The plaintext of a managed slot sealed with [`KEY`], if it is one.
fn open_slot(file: &[u8]) -> Option<Vec<u8>> {
    if file.len() < 20 + 16 || &file[..8] != MANAGED_MAGIC {
        return None;
    }
    Aes256Gcm::new((&KEY).into())
        .decrypt(Nonce::from_slice(&file[8..20]), Payload { msg: &file[20..], aad: MANAGED_MAGIC })
        .ok()
}

/// `ManagedStore::open` on a directory holding one slot: flags bit 0 picks the slot, bit 1
/// writes the input as the file itself (not encrypted), bit 2 puts garbage in the other
/// slot, bit 3 gives the manager a hash that matches no slot.
fn managed_open(rest: &[u8]) {
    let Some((&flags, plaintext)) = rest.split_first() else { return };
    let (slot, raw, garbage, wrong_hash) = (usize::from(flags & 1), flags & 2 != 0, flags & 4 != 0, flags & 8 != 0);
    let dir = &dirs().managed;
    std::fs::create_dir_all(dir).expect("managed dir");
    let file = if raw { plaintext.to_vec() } else { managed_slot(plaintext, [flags; 12]) };
    // New files each time: ext4 flushes a file truncated and rewritten (auto_da_alloc) when
    // it is closed, which would make every run wait for the disk.
    for s in SLOTS {
        let _ = std::fs::remove_file(dir.join(s));
    }
    std::fs::write(dir.join(SLOTS[slot]), &file).expect("write slot");
    if garbage {
        std::fs::write(dir.join(SLOTS[1 - slot]), b"not a slot").expect("write other slot");
    }
    let hash: [u8; 32] = if wrong_hash { [0xAB; 32] } else { Sha256::digest(&file).into() };
    let link = FixedLink(status::SUCCESS, [&hash[..], &KEY].concat());
    let opened = ManagedStore::open(dir, Box::new(link));
    let blobs = match (wrong_hash, raw) {
        (true, _) => None,
        (false, false) => managed::decode(plaintext),
        // The input as the file: it loads if it is a slot sealed with the key after all.
        (false, true) => open_slot(&file).and_then(|p| managed::decode(&p)),
    };
    match (opened, blobs) {
        (Ok(mut store), Some(blobs)) => {
            for (name, value) in &blobs {
                assert_eq!(store.load(name).expect("load").as_ref(), Some(value), "blob {name:?}");
            }
            if !blobs.contains_key("absent") {
                assert_eq!(store.load("absent").expect("load"), None, "a blob the slot does not hold");
            }
        }
        (Err(e), None) => {
            assert!(matches!(e, xvtpm_vtpm::Error::StateCorrupt { .. }), "{e}");
        }
        (Ok(_), None) => panic!("a slot that does not decode was loaded"),
        (Err(e), Some(_)) => panic!("a well-formed slot was refused: {e}"),
    }
    if open_slot(&file).is_some() {
        let info = inspect(&file).expect("a managed slot inspects");
        assert_eq!((info.format, info.payload_bytes), ("managed", file.len() - 20));
    }
}

/// A reply from the manager, as the vTPM's links split it.
fn manager_reply(b: &[u8]) {
    match (parse_reply(b), Reply::decode(b)) {
        (Ok((st, body)), Ok(r)) => assert_eq!((st, body), (r.status, r.body)),
        (Err(_), Err(_)) => {}
        (a, r) => panic!("parse_reply {:?} but Reply::decode {:?}", a.is_ok(), r.is_ok()),
    }
}

fn block_of(b: &[u8]) -> [u8; BLOCK] {
    let mut blk = [0u8; BLOCK];
    let n = b.len().min(BLOCK);
    blk[..n].copy_from_slice(&b[..n]);
    blk
}

/// The manager store's sealed-key block (block 2), read before the root key is known.
fn sealed_block(b: &[u8]) {
    let blk = block_of(b);
    let mut dev = MemDev { blocks: vec![[0; BLOCK], [0; BLOCK], blk], writes: 0 };
    match read_sealed(&mut dev) {
        Ok(v) => {
            assert_eq!(&blk[..8], b"XVTPMSEA");
            let len = u32::from_le_bytes([blk[8], blk[9], blk[10], blk[11]]) as usize;
            assert_eq!(v, blk[12..12 + len]);
        }
        Err(_) => {
            let len = u32::from_le_bytes([blk[8], blk[9], blk[10], blk[11]]) as usize;
            assert!(&blk[..8] != b"XVTPMSEA" || 12 + len > BLOCK, "a well-formed sealed-key block refused");
        }
    }
    assert_eq!(ensure_empty(&mut dev).is_ok(), blk.iter().all(|&x| x == 0));
    assert_eq!(dev.writes, 0);
}

/// A root slot as read from the disk, and a root of the input's fields through seal and open.
fn root_slot(b: &[u8]) {
    let blk = block_of(b);
    match Root::open(&KEY, &blk) {
        Ok(None) => assert!(blk.iter().all(|&x| x == 0), "a written slot read as empty"),
        Ok(Some(r)) => assert_eq!(Root::open(&KEY, &r.seal(&KEY)), Ok(Some(r))),
        Err(_) => assert!(blk.iter().any(|&x| x != 0), "an empty slot refused"),
    }
    let mut f = [0u8; 101];
    let n = b.len().min(f.len());
    f[..n].copy_from_slice(&b[..n]);
    let u64_at = |at: usize| u64::from_le_bytes(f[at..at + 8].try_into().expect("8 bytes"));
    let mut r = Root {
        seq: u64_at(0),
        counter: u64_at(8),
        node: u64_at(16),
        depth: f[24],
        count: u64_at(25),
        high_water: u64_at(33),
        // Both versions a root may carry.
        version: if f[89] & 1 == 0 {
            xvtpm_vtpmmgr::store::root::VERSION
        } else {
            xvtpm_vtpmmgr::store::root::VERSION_1
        },
        ..Root::default()
    };
    r.tag.copy_from_slice(&f[41..57]);
    r.sealed_digest.copy_from_slice(&f[57..89]);
    let sealed = r.seal(&KEY);
    assert_eq!(Root::open(&KEY, &sealed), Ok(Some(r)), "root round trip");
    assert!(Root::open(&[0x43; 32], &sealed).is_err(), "a root opened with another key");
    assert_eq!(r.slot(), r.seq % 2);
}

/// A node's plaintext, and the node through seal and open.
fn tree_node(b: &[u8]) {
    let mut p = [0u8; PLAIN];
    let n = b.len().min(PLAIN);
    p[..n].copy_from_slice(&b[..n]);
    let count = usize::from(u16::from_le_bytes([p[2], p[3]]));
    match Node::decode_plain(&p) {
        Ok(node) => {
            let enc = node.encode();
            assert_eq!(Node::decode_plain(&enc).as_ref(), Ok(&node), "node round trip");
            let entry = match &node {
                Node::Leaf(recs) => {
                    assert_eq!((p[0], recs.len()), (1, count));
                    RECORD_LEN
                }
                Node::Internal(kids) => {
                    assert_eq!((p[0], kids.len()), (2, count));
                    40
                }
            };
            assert_eq!((enc[0], &enc[2..4 + count * entry]), (p[0], &p[2..4 + count * entry]), "entries");
            let at = 3 + u64::from(p[1]);
            let (blk, tag) = node::seal(&KEY, at, &node);
            assert_eq!(node::open(&KEY, at, &blk, &tag).as_ref(), Ok(&node), "seal then open");
            assert!(node::open(&KEY, at + 1, &blk, &tag).is_err(), "a node opened at another block");
        }
        Err(_) => {
            let valid = (p[0] == 1 && count <= LEAF_CAP) || (p[0] == 2 && (1..=FANOUT).contains(&count));
            assert!(!valid, "a well-formed node refused (kind {}, {count} entries)", p[0]);
        }
    }
    let raw = block_of(b);
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&raw[BLOCK - 16..]);
    assert!(node::open(&KEY, 3, &raw, &tag).is_err(), "a forged block authenticated");
}

/// Blob maps for the seeds.
pub fn sample_blobs() -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    m.insert("permall".to_string(), vec![0x11; 40]);
    m.insert("volatilestate".to_string(), b"volatile".to_vec());
    m
}
