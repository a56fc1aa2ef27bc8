//! The store on its own: 20,000 records, O(log n) blocks per update, every byte of live data
//! authenticated, old copies refused, and crashes at every write leaving the old or the new
//! state.

use rand::{Rng, RngCore, SeedableRng};
use xvtpm_vtpmmgr::store::dev::{BlockDev, MemDev, BLOCK};
use xvtpm_vtpmmgr::store::{self, CounterState, Record, Store, FIRST_NODE};
use xvtpm_vtpmmgr::{Error, Result};

const KEY: [u8; 32] = [0x42; 32];

fn rec(rng: &mut impl RngCore, uuid: [u8; 16]) -> Record {
    let mut r = Record::new(uuid, 1);
    rng.fill_bytes(&mut r.hash);
    rng.fill_bytes(&mut r.key);
    r.flags = store::record::HAS_KEY;
    r
}

#[test]
fn twenty_thousand_records_with_logarithmic_updates() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut s = Store::create(MemDev::default(), KEY, b"sealed", 0).expect("create");
    let mut recs = Vec::new();
    for _ in 0..20_000 {
        let mut u = [0u8; 16];
        rng.fill_bytes(&mut u);
        let r = rec(&mut rng, u);
        let c = s.put(&r).expect("put");
        // A split writes two nodes per level and a new root node at worst.
        assert!(c.blocks <= 2 * u64::from(s.root().depth) + 2, "{} blocks at depth {}", c.blocks, s.root().depth);
        recs.push(r);
    }
    assert_eq!(s.len(), 20_000);
    assert_eq!(s.root().depth, 3, "20k records: leaves of 33, nodes of 101");
    // An update of one record in the full store writes its path and the root slot.
    let mut r = recs[123].clone();
    r.key = [9; 32];
    let before = s.dev().writes;
    let c = s.put(&r).expect("update");
    assert_eq!(c.blocks, 4, "leaf, two internal nodes, root slot");
    assert_eq!(s.dev().writes - before, 4);
    recs[123] = r;
    for r in recs.iter().step_by(97) {
        assert_eq!(s.get(&r.uuid).expect("get").as_ref(), Some(r));
    }
    // Delete a third, reopen, and find exactly the rest.
    let counter = s.root().counter;
    for r in recs.iter().step_by(3) {
        assert!(s.delete(&r.uuid).expect("delete").is_some());
    }
    assert!(s.delete(&[0xEE; 16]).expect("delete missing").is_none());
    let counter = counter + recs.iter().step_by(3).count() as u64;
    let dev = s.dev().clone();
    let (s, state) = Store::open(dev, KEY, counter).expect("reopen");
    assert_eq!(state, CounterState::InStep);
    let all = s.list().expect("list");
    let mut want: Vec<Record> = recs.iter().enumerate().filter(|(i, _)| i % 3 != 0).map(|(_, r)| r.clone()).collect();
    want.sort_by_key(|r| r.uuid);
    assert_eq!(all, want);
    // Replaced blocks are reused: the store does not grow with updates.
    assert!(s.root().high_water < FIRST_NODE + 2 * (20_000 / 16), "high water {}", s.root().high_water);
}

#[test]
fn deleting_everything_and_starting_over() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let mut s = Store::create(MemDev::default(), KEY, b"sealed", 5).expect("create");
    let uuids: Vec<[u8; 16]> = (0..500u32)
        .map(|i| {
            let mut u = [0u8; 16];
            u[..4].copy_from_slice(&i.to_be_bytes());
            u
        })
        .collect();
    for u in &uuids {
        s.put(&rec(&mut rng, *u)).expect("put");
    }
    for u in uuids.iter().rev() {
        s.delete(u).expect("delete");
    }
    assert!(s.is_empty());
    assert_eq!(s.root().depth, 0);
    let counter = s.root().counter;
    let (mut s, _) = Store::open(s.dev().clone(), KEY, counter).expect("reopen empty");
    s.put(&rec(&mut rng, uuids[7])).expect("put again");
    assert_eq!(s.list().expect("list").len(), 1);
}

fn filled(n: usize) -> (MemDev, u64, Vec<Record>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut s = Store::create(MemDev::default(), KEY, b"sealed-key", 0).expect("create");
    let mut recs = Vec::new();
    for _ in 0..n {
        let mut u = [0u8; 16];
        rng.fill_bytes(&mut u);
        let r = rec(&mut rng, u);
        s.put(&r).expect("put");
        recs.push(r);
    }
    let c = s.root().counter;
    (s.dev().clone(), c, recs)
}

#[test]
fn a_flipped_byte_anywhere_in_live_data_is_detected() {
    let (dev, counter, _) = filled(200);
    let (s, _) = Store::open(dev.clone(), KEY, counter).expect("opens");
    let live_slot = s.root().slot() as usize;
    // Live data: the current root slot, the sealed-key block, and every node of the tree.
    let mut live: Vec<usize> = vec![live_slot, store::SEALED_BLOCK as usize];
    live.extend((FIRST_NODE as usize..dev.blocks.len()).filter(|b| {
        let mut t = dev.clone();
        t.blocks[*b][100] ^= 1;
        Store::open(t, KEY, counter).is_err()
    }));
    assert!(live.len() > 8, "the tree has several nodes");
    let mut rng = rand::rngs::StdRng::seed_from_u64(10);
    for i in 0..400 {
        let b = live[i % live.len()];
        let at = rng.gen_range(0..BLOCK);
        let mut t = dev.clone();
        t.blocks[b][at] ^= 1 << rng.gen_range(0..8);
        match Store::open(t, KEY, counter) {
            Err(Error::Corrupt { why, .. }) => assert!(!why.is_empty()),
            // The slot that was live falls back to the older slot, which is a commit behind
            // the hardware counter: refused as a rollback.
            Err(Error::Rollback { .. }) if b == live_slot => {}
            other => panic!("flip in block {b} at {at} not detected: {other:?}"),
        }
    }
}

#[test]
fn an_old_copy_is_refused_as_rollback() {
    let (old, old_counter, _) = filled(50);
    let (mut s, _) = Store::open(old.clone(), KEY, old_counter).expect("opens");
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    s.put(&rec(&mut rng, [1; 16])).expect("newer record");
    let hw = s.root().counter;
    match Store::open(old, KEY, hw) {
        Err(Error::Rollback { found, hw: h, .. }) => assert_eq!((found, h), (old_counter, hw)),
        other => panic!("old copy accepted: {other:?}"),
    }
    // The newest root one ahead of the counter: a stop between the root write and the
    // increment.
    let (_, state) = Store::open(s.dev().clone(), KEY, hw - 1).expect("one behind");
    assert_eq!(state, CounterState::Behind);
    assert!(Store::open(s.dev().clone(), KEY, hw - 2).is_err(), "two ahead is not a crash");
    assert!(matches!(Store::open(s.dev().clone(), [1; 32], hw), Err(Error::Corrupt { .. })), "wrong key");
}

/// A device that fails every write after the first `budget`, and may tear the failing one.
struct Crashing {
    inner: MemDev,
    budget: u64,
}

impl BlockDev for Crashing {
    fn read(&mut self, n: u64, buf: &mut [u8; BLOCK]) -> Result<()> {
        self.inner.read(n, buf)
    }
    fn write(&mut self, n: u64, buf: &[u8; BLOCK]) -> Result<()> {
        if self.budget == 0 {
            // A torn write: half the block made it.
            let mut torn = [0u8; BLOCK];
            self.inner.read(n, &mut torn)?;
            torn[..BLOCK / 2].copy_from_slice(&buf[..BLOCK / 2]);
            self.inner.write(n, &torn)?;
            return Err(Error::Store("crash".into()));
        }
        self.budget -= 1;
        self.inner.write(n, buf)
    }
    fn sync(&mut self) -> Result<()> {
        Ok(())
    }
    fn name(&self) -> String {
        "crashing".into()
    }
}

#[test]
fn a_crash_at_any_write_leaves_the_old_or_the_new_state() {
    let (dev, counter, recs) = filled(300);
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    for budget in 0..6 {
        for victim in [0usize, 150, 299] {
            let mut new = recs[victim].clone();
            rng.fill_bytes(&mut new.key);
            let (mut s, _) = Store::open(Crashing { inner: dev.clone(), budget }, KEY, counter).expect("opens");
            let acked = s.put(&new).is_ok();
            let after = s.dev().inner.clone();
            // The counter: in step with the old root, or one behind the new one.
            let (s2, _) = Store::open(after, KEY, counter).expect("a crash never leaves the store unreadable");
            let got = s2.get(&new.uuid).expect("get").expect("record still there");
            assert!(got == recs[victim] || got == new, "neither old nor new");
            if acked {
                assert_eq!(got, new, "an acknowledged update is durable");
            }
            assert_eq!(s2.len(), 300);
        }
    }
}

/// The root key itself never keys AES-GCM: roots and nodes use its own sub-key (version 2),
/// so the root key only feeds key derivations. A version-1 store (under the root key) still
/// opens and updates.
#[test]
fn roots_and_nodes_use_the_store_sub_key_and_version_1_still_opens() {
    use xvtpm_vtpmmgr::store::root::{Root, VERSION_1};
    use xvtpm_vtpmmgr::store::{subkey, Purpose};
    let mut s = Store::create(MemDev::default(), KEY, b"sealed", 0).expect("create");
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    s.put(&rec(&mut rng, [1; 16])).expect("put");
    let mut slot = [0u8; BLOCK];
    let mut dev = s.dev().clone();
    dev.read(s.root().slot(), &mut slot).expect("read");
    assert!(Root::open(&KEY, &slot).is_err(), "a root under the root key itself");
    let aead = subkey(&KEY, Purpose::StoreAead);
    assert_eq!(Root::open(&aead, &slot).expect("opens").map(|r| r.version), Some(2));

    // An empty version-1 store: its root under the root key.
    let mut v1 = Store::create(MemDev::default(), KEY, b"sealed", 5).expect("create").dev().clone();
    let mut b = [0u8; BLOCK];
    v1.read(1, &mut b).expect("read");
    let r = Root::open(&aead, &b).expect("open").expect("a root");
    v1.write(1, &Root { version: VERSION_1, ..r }.seal(&KEY)).expect("write");
    let (mut s1, state) = Store::open(v1, KEY, 5).expect("a version-1 store opens");
    assert_eq!(state, CounterState::InStep);
    let r1 = rec(&mut rng, [2; 16]);
    s1.put(&r1).expect("and updates");
    let (s1, _) = Store::open(s1.dev().clone(), KEY, 6).expect("reopens");
    assert_eq!(s1.get(&r1.uuid).expect("get"), Some(r1));
    assert_eq!(s1.root().version, VERSION_1, "it stays version 1");
}
