//! The manager's store: every vTPM's record in a copy-on-write B+tree of encrypted 4 KiB
//! blocks, under two alternating root slots.
//!
//! Layout: blocks 0 and 1 are the root slots, block 2 holds the sealed root key (readable
//! before the key is known), tree nodes live from block 3 on. An update writes new copies of
//! the nodes on its path (O(log n) blocks), syncs, then writes the other root slot and syncs
//! again; only then are the replaced blocks reused. At every moment one root names a
//! complete, authenticated tree.

pub mod dev;
pub mod node;
pub mod record;
pub mod root;

use std::collections::{BTreeSet, HashMap};

use sha2::{Digest, Sha256};

use self::dev::{BlockDev, BLOCK};
use self::node::{Child, Node, FANOUT, LEAF_CAP, TAG};
pub use self::record::Record;
use self::root::Root;
use crate::{Error, Result};

/// Block of the sealed root key.
pub const SEALED_BLOCK: u64 = 2;
/// First block of the tree.
pub const FIRST_NODE: u64 = 3;
const SEALED_MAGIC: &[u8; 8] = b"XVTPMSEA";

/// What a sub-key of the root key is for: each purpose its own key, so no key serves two
/// algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The TPM 2.0 counter's authValue.
    CounterAuth,
    /// The attestation key's authValue (TPM 2.0), or the TPM 1.2 quote key's usage auth.
    AkAuth,
    /// The key that signs migration bundles.
    MigrationSigning,
    /// The store's own AES-256-GCM key.
    StoreAead,
}

/// The sub-key of `root` for `purpose`: HKDF-SHA256. Its last byte is never zero: used as a
/// TPM authValue, trailing zeros would be dropped.
pub fn subkey(root: &[u8; 32], purpose: Purpose) -> [u8; 32] {
    let info: &[u8] = match purpose {
        Purpose::CounterAuth => b"nv counter auth",
        Purpose::AkAuth => b"attestation key auth",
        Purpose::MigrationSigning => b"migration signing key",
        Purpose::StoreAead => b"store aead key",
    };
    let mut k = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's limit; this cannot fail.
    let _ = hkdf::Hkdf::<Sha256>::new(Some(b"xvtpm-vtpmmgr-subkey-v1"), root).expand(info, &mut k);
    k[31] |= 1;
    k
}

/// What opening found about the hardware counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterState {
    /// The store's root was committed under the counter's current value.
    InStep,
    /// The newest root is one ahead: the manager stopped between writing it and incrementing
    /// the counter. Increment the counter before the next commit.
    Behind,
}

/// What a commit wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// Blocks written, the root slot included.
    pub blocks: u64,
    /// The hardware counter value the new root carries: bring the counter to it.
    pub counter: u64,
}

/// Reads the sealed-key block: what the hardware TPM must unseal before the store opens.
pub fn read_sealed(dev: &mut dyn BlockDev) -> Result<Vec<u8>> {
    let mut b = [0u8; BLOCK];
    dev.read(SEALED_BLOCK, &mut b)?;
    if &b[..8] != SEALED_MAGIC {
        return Err(Error::Corrupt { store: dev.name(), why: "no sealed-key block (not a manager store?)".into() });
    }
    let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize;
    b.get(12..12 + len)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| Error::Corrupt { store: dev.name(), why: format!("sealed-key block claims {len} bytes") })
}

/// Refuses a device whose root slots or sealed-key block hold anything: a store is never
/// overwritten by a new one.
pub fn ensure_empty(dev: &mut dyn BlockDev) -> Result<()> {
    let mut probe = [0u8; BLOCK];
    for n in [0, 1, SEALED_BLOCK] {
        dev.read(n, &mut probe)?;
        if probe.iter().any(|&b| b != 0) {
            return Err(Error::Store(format!("{} already holds data; refusing to overwrite it", dev.name())));
        }
    }
    Ok(())
}

/// The store.
pub struct Store<D> {
    dev: D,
    /// The root key: only key derivations use it.
    root_key: [u8; 32],
    /// The key roots and nodes are authenticated and encrypted with (AES-256-GCM): the root
    /// key's [`Purpose::StoreAead`] sub-key, or the root key itself in a version-1 store.
    key: [u8; 32],
    root: Root,
    /// Decrypted nodes of the current tree.
    cache: HashMap<u64, Node>,
    /// Blocks below the high-water mark not in the current tree.
    free: BTreeSet<u64>,
    /// A commit failed after writing: the device's state is unknown until the store is
    /// reopened, so no further commit may reuse its blocks or slot.
    poisoned: bool,
    /// The newest root's counter value is not in the hardware counter yet (its increment was
    /// deferred): commits keep that value instead of taking the next one.
    counter_pending: bool,
}

impl<D> std::fmt::Debug for Store<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("root", &self.root).field("nodes", &self.cache.len()).finish_non_exhaustive()
    }
}

/// Changes of one update, applied to the store only once they are durable.
#[derive(Default)]
struct Txn {
    writes: Vec<(u64, Node)>,
    allocated: Vec<u64>,
    replaced: Vec<u64>,
    high_water: u64,
}

impl<D: BlockDev> Store<D> {
    /// Creates an empty store on `dev` with root key `key`, holding `sealed` (the root key as
    /// the hardware TPM sealed it), committed under hardware counter value `counter`.
    pub fn create(mut dev: D, key: [u8; 32], sealed: &[u8], counter: u64) -> Result<Self> {
        ensure_empty(&mut dev)?;
        if sealed.len() > BLOCK - 12 {
            return Err(Error::Store(format!("sealed key of {} bytes does not fit a block", sealed.len())));
        }
        let mut sb = [0u8; BLOCK];
        sb[..8].copy_from_slice(SEALED_MAGIC);
        sb[8..12].copy_from_slice(&(sealed.len() as u32).to_le_bytes());
        sb[12..12 + sealed.len()].copy_from_slice(sealed);
        dev.write(SEALED_BLOCK, &sb)?;
        let root = Root {
            seq: 1,
            counter,
            high_water: FIRST_NODE,
            sealed_digest: Sha256::digest(sb).into(),
            version: root::VERSION,
            ..Root::default()
        };
        let (root_key, key) = (key, subkey(&key, Purpose::StoreAead));
        dev.sync()?;
        dev.write(root.slot(), &root.seal(&key))?;
        dev.sync()?;
        Ok(Self::with_root(dev, root_key, key, root))
    }

    /// A store on `dev` whose newest root is `root`, with nothing cached yet.
    fn with_root(dev: D, root_key: [u8; 32], key: [u8; 32], root: Root) -> Self {
        Self {
            dev,
            root_key,
            key,
            root,
            cache: HashMap::new(),
            free: BTreeSet::new(),
            poisoned: false,
            counter_pending: false,
        }
    }

    /// Opens the store with its root key: picks the newest root that authenticates, checks it
    /// against hardware counter value `hw`, and verifies every node of its tree.
    pub fn open(dev: D, key: [u8; 32], hw: u64) -> Result<(Self, CounterState)> {
        let name = dev.name();
        let store = Self::open_verified(dev, key)?;
        let state = match store.root.counter {
            c if c == hw => CounterState::InStep,
            c if c == hw.wrapping_add(1) => CounterState::Behind,
            c if c < hw => return Err(Error::Rollback { store: name, found: c, hw }),
            c => {
                return Err(Error::Corrupt {
                    store: name,
                    why: format!(
                        "its counter {c} is ahead of the hardware counter {hw} by more than one commit (another TPM, or a cleared one?)"
                    ),
                })
            }
        };
        Ok((store, state))
    }

    /// Opens the store with its root key whatever the hardware counter says (recovery): the
    /// newest root that authenticates, and every node of its tree verified.
    pub fn open_verified(mut dev: D, root_key: [u8; 32]) -> Result<Self> {
        let name = dev.name();
        let corrupt = |why: String| Error::Corrupt { store: name.clone(), why };
        let mut best: Option<(Root, [u8; 32])> = None;
        let mut problems = Vec::new();
        let aead = subkey(&root_key, Purpose::StoreAead);
        for slot in 0..2 {
            let mut b = [0u8; BLOCK];
            dev.read(slot, &mut b)?;
            // Version 2 under the sub-key; a version-1 store under the root key itself.
            let opened = match Root::open(&aead, &b) {
                Ok(Some(r)) if r.version == root::VERSION => Ok(Some((r, aead))),
                Ok(Some(_)) => Err("is of version 1 but not under the root key".to_string()),
                Ok(None) => Ok(None),
                Err(e) => match Root::open(&root_key, &b) {
                    Ok(Some(r)) if r.version == root::VERSION_1 => Ok(Some((r, root_key))),
                    Ok(Some(_)) => Err("claims version 2 under the root key".to_string()),
                    _ => Err(e),
                },
            };
            match opened {
                Ok(Some((r, k))) if r.slot() == slot => {
                    if best.is_none_or(|(x, _)| r.seq > x.seq) {
                        best = Some((r, k));
                    }
                }
                Ok(Some(_)) => problems.push(format!("root slot {slot} holds a root of the other slot")),
                Ok(None) => {}
                Err(e) => problems.push(format!("root slot {slot} {e}")),
            }
        }
        let Some((root, key)) = best else {
            return Err(corrupt(format!("no valid root: {}", problems.join("; "))));
        };
        if !problems.is_empty() {
            log::warn!("store {name}: using root {} ({})", root.seq, problems.join("; "));
        }
        let mut sb = [0u8; BLOCK];
        dev.read(SEALED_BLOCK, &mut sb)?;
        if <[u8; 32]>::from(Sha256::digest(sb)) != root.sealed_digest {
            return Err(corrupt("the sealed-key block is not the one the root was written with".into()));
        }
        let mut store = Self::with_root(dev, root_key, key, root);
        store.load_tree()?;
        Ok(store)
    }

    /// Rewrites both root slots with hardware counter value `hw` (recovery: the operator
    /// accepts the TPM's counter). The tree is unchanged.
    pub fn rebase_counter(&mut self, hw: u64) -> Result<()> {
        for _ in 0..2 {
            let mut root = self.root;
            root.seq += 1;
            root.counter = hw;
            self.dev.write(root.slot(), &root.seal(&self.key))?;
            self.dev.sync()?;
            self.root = root;
        }
        self.counter_pending = false;
        Ok(())
    }

    /// Whether commits keep the newest root's counter value (`true`: its increment is
    /// deferred, so the hardware counter is one behind and the next increment covers them
    /// too) or take the next one (`false`, the default: the counter holds the newest value).
    pub fn set_counter_pending(&mut self, pending: bool) {
        self.counter_pending = pending;
    }

    fn corrupt(&self, why: String) -> Error {
        Error::Corrupt { store: self.dev.name(), why }
    }

    /// Reads and verifies every node; builds the cache and the free list.
    fn load_tree(&mut self) -> Result<()> {
        let mut count = 0u64;
        if self.root.depth > 0 {
            let mut stack = vec![(self.root.node, self.root.tag, self.root.depth, [0u8; 16], None::<[u8; 16]>)];
            while let Some((n, tag, depth, lo, hi)) = stack.pop() {
                if n < FIRST_NODE || n >= self.root.high_water || self.cache.contains_key(&n) {
                    return Err(self.corrupt(format!("tree points at block {n}, outside the tree or twice")));
                }
                let mut b = [0u8; BLOCK];
                self.dev.read(n, &mut b)?;
                let node = node::open(&self.key, n, &b, &tag).map_err(|e| self.corrupt(format!("block {n} {e}")))?;
                let in_range = |k: &[u8; 16]| *k >= lo && hi.is_none_or(|h| *k < h);
                match (&node, depth) {
                    (Node::Leaf(recs), 1) => {
                        let sorted = recs.windows(2).all(|w| w[0].uuid < w[1].uuid);
                        if !sorted || !recs.iter().all(|r| in_range(&r.uuid)) {
                            return Err(self.corrupt(format!("block {n}: records out of order")));
                        }
                        count += recs.len() as u64;
                    }
                    (Node::Internal(kids), d) if d > 1 => {
                        let sorted = kids.windows(2).all(|w| w[0].key < w[1].key);
                        if !sorted || !kids.iter().skip(1).all(|c| in_range(&c.key)) {
                            return Err(self.corrupt(format!("block {n}: children out of order")));
                        }
                        for (i, c) in kids.iter().enumerate() {
                            let clo = if i == 0 { lo } else { c.key };
                            let chi = kids.get(i + 1).map(|x| x.key).or(hi);
                            stack.push((c.block, c.tag, d - 1, clo, chi));
                        }
                    }
                    _ => return Err(self.corrupt(format!("block {n}: wrong node kind at depth {depth}"))),
                }
                self.cache.insert(n, node);
            }
        }
        if count != self.root.count {
            return Err(self.corrupt(format!("root says {} records, the tree holds {count}", self.root.count)));
        }
        self.free = (FIRST_NODE..self.root.high_water).filter(|b| !self.cache.contains_key(b)).collect();
        Ok(())
    }

    /// The root key's sub-key for `purpose`: as bound to the hardware TPM as the store itself.
    pub fn subkey(&self, purpose: Purpose) -> [u8; 32] {
        subkey(&self.root_key, purpose)
    }

    /// A key for `label` derived from the root key (HMAC-SHA256; the migration key's seed,
    /// kept so existing managers keep their migration key).
    pub fn derive_key(&self, label: &[u8]) -> [u8; 32] {
        use hmac::Mac;
        let mut mac = <hmac::Hmac<Sha256> as hmac::Mac>::new_from_slice(&self.root_key).expect("any key length");
        mac.update(label);
        mac.finalize().into_bytes().into()
    }

    /// The current root.
    pub fn root(&self) -> &Root {
        &self.root
    }

    /// Number of records.
    pub fn len(&self) -> u64 {
        self.root.count
    }

    /// Whether the store has no records.
    pub fn is_empty(&self) -> bool {
        self.root.count == 0
    }

    fn node(&self, n: u64) -> Result<&Node> {
        self.cache.get(&n).ok_or_else(|| self.corrupt(format!("block {n} is not in the verified tree")))
    }

    /// The record of `uuid`.
    pub fn get(&self, uuid: &[u8; 16]) -> Result<Option<Record>> {
        if self.root.depth == 0 {
            return Ok(None);
        }
        let mut n = self.root.node;
        loop {
            match self.node(n)? {
                Node::Internal(kids) => n = kids[child_index(kids, uuid)].block,
                Node::Leaf(recs) => {
                    return Ok(recs.binary_search_by(|r| r.uuid.cmp(uuid)).ok().map(|i| recs[i].clone()));
                }
            }
        }
    }

    /// Every record, in uuid order.
    pub fn list(&self) -> Result<Vec<Record>> {
        let mut out = Vec::new();
        if self.root.depth > 0 {
            self.collect(self.root.node, &mut out)?;
        }
        Ok(out)
    }

    fn collect(&self, n: u64, out: &mut Vec<Record>) -> Result<()> {
        match self.node(n)? {
            Node::Leaf(recs) => out.extend(recs.iter().cloned()),
            Node::Internal(kids) => {
                for c in kids.clone() {
                    self.collect(c.block, out)?;
                }
            }
        }
        Ok(())
    }

    fn alloc(&self, txn: &mut Txn) -> u64 {
        let n = self.free.iter().find(|b| !txn.allocated.contains(b)).copied().unwrap_or_else(|| {
            txn.high_water += 1;
            txn.high_water - 1
        });
        txn.allocated.push(n);
        n
    }

    /// Writes `node` to a fresh block in `txn`; its child pointer.
    fn place(&self, txn: &mut Txn, key: [u8; 16], node: Node) -> (Child, [u8; BLOCK]) {
        let n = self.alloc(txn);
        let (blk, tag) = node::seal(&self.key, n, &node);
        txn.writes.push((n, node));
        (Child { key, block: n, tag }, blk)
    }

    /// Inserts or replaces `rec` below node `n`; the replacement nodes (two after a split).
    fn insert(
        &self,
        txn: &mut Txn,
        blocks: &mut Vec<(u64, [u8; BLOCK])>,
        n: u64,
        key: [u8; 16],
        rec: &Record,
    ) -> Result<Vec<Child>> {
        txn.replaced.push(n);
        let parts: Vec<(Node, [u8; 16])> = match self.node(n)?.clone() {
            Node::Leaf(mut recs) => {
                match recs.binary_search_by(|r| r.uuid.cmp(&rec.uuid)) {
                    Ok(i) => recs[i] = rec.clone(),
                    Err(i) => recs.insert(i, rec.clone()),
                }
                if recs.len() <= LEAF_CAP {
                    vec![(Node::Leaf(recs), key)]
                } else {
                    let right = recs.split_off(recs.len() / 2);
                    let rkey = right[0].uuid;
                    vec![(Node::Leaf(recs), key), (Node::Leaf(right), rkey)]
                }
            }
            Node::Internal(mut kids) => {
                let i = child_index(&kids, &rec.uuid);
                let ckey = kids[i].key;
                let new = self.insert(txn, blocks, kids[i].block, ckey, rec)?;
                kids.splice(i..=i, new);
                if kids.len() <= FANOUT {
                    vec![(Node::Internal(kids), key)]
                } else {
                    let right = kids.split_off(kids.len() / 2);
                    let rkey = right[0].key;
                    vec![(Node::Internal(kids), key), (Node::Internal(right), rkey)]
                }
            }
        };
        Ok(parts
            .into_iter()
            .map(|(node, k)| {
                let (c, b) = self.place(txn, k, node);
                blocks.push((c.block, b));
                c
            })
            .collect())
    }

    /// Removes `uuid` below node `n`; the replacement (none when the node became empty).
    fn remove(
        &self,
        txn: &mut Txn,
        blocks: &mut Vec<(u64, [u8; BLOCK])>,
        n: u64,
        key: [u8; 16],
        uuid: &[u8; 16],
    ) -> Result<Option<Child>> {
        txn.replaced.push(n);
        let node = match self.node(n)?.clone() {
            Node::Leaf(mut recs) => {
                if let Ok(i) = recs.binary_search_by(|r| r.uuid.cmp(uuid)) {
                    recs.remove(i);
                }
                (!recs.is_empty()).then_some(Node::Leaf(recs))
            }
            Node::Internal(mut kids) => {
                let i = child_index(&kids, uuid);
                match self.remove(txn, blocks, kids[i].block, kids[i].key, uuid)? {
                    Some(c) => kids[i] = c,
                    None => {
                        kids.remove(i);
                    }
                }
                if let Some(first) = kids.first_mut() {
                    // The first child's key is the node's own lower bound.
                    first.key = key;
                }
                (!kids.is_empty()).then_some(Node::Internal(kids))
            }
        };
        Ok(node.map(|node| {
            let (c, b) = self.place(txn, key, node);
            blocks.push((c.block, b));
            c
        }))
    }

    /// Writes the transaction's blocks, then the new root; applies it once both are durable.
    fn commit(
        &mut self,
        txn: Txn,
        blocks: Vec<(u64, [u8; BLOCK])>,
        top: Option<(Child, u8)>,
        count: u64,
    ) -> Result<Commit> {
        if self.poisoned {
            return Err(Error::Store(format!("{}: an earlier update failed; reopen the store", self.dev.name())));
        }
        let r = self.write_commit(txn, blocks, top, count);
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    fn write_commit(
        &mut self,
        mut txn: Txn,
        blocks: Vec<(u64, [u8; BLOCK])>,
        top: Option<(Child, u8)>,
        count: u64,
    ) -> Result<Commit> {
        for (n, b) in &blocks {
            self.dev.write(*n, b)?;
        }
        self.dev.sync()?;
        let mut root = self.root;
        root.seq += 1;
        if !self.counter_pending {
            root.counter += 1;
        }
        root.count = count;
        root.high_water = txn.high_water;
        match top {
            Some((c, depth)) => (root.node, root.tag, root.depth) = (c.block, c.tag, depth),
            None => (root.node, root.tag, root.depth) = (0, [0; TAG], 0),
        }
        self.dev.write(root.slot(), &root.seal(&self.key))?;
        self.dev.sync()?;
        // Durable: the replaced blocks may be reused from the next update on (a block both
        // allocated and dropped in this update is free again too).
        for n in &txn.allocated {
            self.free.remove(n);
        }
        for n in txn.replaced.drain(..) {
            self.cache.remove(&n);
            self.free.insert(n);
        }
        for (n, node) in txn.writes {
            self.cache.insert(n, node);
        }
        self.root = root;
        Ok(Commit { blocks: blocks.len() as u64 + 1, counter: root.counter })
    }

    /// Inserts or replaces a record and commits.
    pub fn put(&mut self, rec: &Record) -> Result<Commit> {
        let existed = self.get(&rec.uuid)?.is_some();
        let mut txn = Txn { high_water: self.root.high_water, ..Txn::default() };
        let mut blocks = Vec::new();
        let top = if self.root.depth == 0 {
            let (c, b) = self.place(&mut txn, [0; 16], Node::Leaf(vec![rec.clone()]));
            blocks.push((c.block, b));
            (c, 1)
        } else {
            let mut parts = self.insert(&mut txn, &mut blocks, self.root.node, [0; 16], rec)?;
            if parts.len() == 1 {
                (parts.remove(0), self.root.depth)
            } else {
                let (c, b) = self.place(&mut txn, [0; 16], Node::Internal(parts));
                blocks.push((c.block, b));
                (c, self.root.depth + 1)
            }
        };
        let count = self.root.count + u64::from(!existed);
        self.commit(txn, blocks, Some(top), count)
    }

    /// Removes a record and commits; `None` when there was none (nothing is written).
    pub fn delete(&mut self, uuid: &[u8; 16]) -> Result<Option<Commit>> {
        if self.get(uuid)?.is_none() {
            return Ok(None);
        }
        let mut txn = Txn { high_water: self.root.high_water, ..Txn::default() };
        let mut blocks = Vec::new();
        let mut top = self.remove(&mut txn, &mut blocks, self.root.node, [0; 16], uuid)?.map(|c| (c, self.root.depth));
        // A root with one child hands the root to it (one block is left behind unwritten).
        while let Some((c, depth)) = top {
            let only_child = match txn.writes.iter().find(|(n, _)| *n == c.block) {
                Some((_, Node::Internal(kids))) if kids.len() == 1 && depth > 1 => kids[0],
                _ => break,
            };
            txn.replaced.push(c.block);
            blocks.retain(|(n, _)| *n != c.block);
            txn.writes.retain(|(n, _)| *n != c.block);
            top = Some((only_child, depth - 1));
        }
        let count = self.root.count - 1;
        self.commit(txn, blocks, top, count).map(Some)
    }

    /// The device (tests inspect it).
    pub fn dev(&mut self) -> &mut D {
        &mut self.dev
    }
}

/// The child of an internal node whose subtree holds `uuid`.
fn child_index(kids: &[Child], uuid: &[u8; 16]) -> usize {
    kids.partition_point(|c| c.key <= *uuid).saturating_sub(1)
}
