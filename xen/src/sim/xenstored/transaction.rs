//! Transactions: each is its own view of the store, applied at commit if nothing it touched
//! changed meanwhile, like C xenstored's generation-count check.

use std::collections::{BTreeMap, HashMap};

use super::tree::{Node, Tree};
use super::watch::WatchTrigger;
use super::XsResult;
use crate::XsErrno;

/// Transactions one connection may have open.
const MAX_TRANSACTIONS: usize = 16;

/// An open transaction: its own changes over the committed tree, plus what it has seen.
#[derive(Debug, Default)]
pub(super) struct Transaction {
    /// Nodes it wrote (`None`: removed), applied to the tree on commit.
    overlay: HashMap<String, Option<Node>>,
    /// Generation of every node it touched when it first did (`None`: missing); any
    /// difference at commit time is a conflict.
    accessed: HashMap<String, Option<u64>>,
    /// Watch triggers held back until commit.
    triggers: Vec<WatchTrigger>,
}

impl Transaction {
    /// Holds a request's watch triggers back until commit.
    pub(super) fn hold_back(&mut self, triggers: Vec<WatchTrigger>) {
        self.triggers.extend(triggers);
    }

    /// Applies the transaction if nothing it touched changed since it first did; returns the
    /// watch triggers it held back.
    pub(super) fn commit(self, tree: &mut Tree) -> XsResult<Vec<WatchTrigger>> {
        if self.accessed.iter().any(|(path, gen)| tree.gen(path) != *gen) {
            return Err(XsErrno::EAGAIN);
        }
        for (path, node) in self.overlay {
            match node {
                Some(n) => tree.store(&path, n),
                None => tree.remove(&path),
            }
        }
        Ok(self.triggers)
    }
}

/// A connection's open transactions, by id.
#[derive(Debug)]
pub(super) struct OpenTransactions {
    open: BTreeMap<u32, Transaction>,
    next_id: u32,
}

impl OpenTransactions {
    pub(super) fn new() -> Self {
        OpenTransactions { open: BTreeMap::new(), next_id: 1 }
    }

    /// XS_TRANSACTION_START, sent with transaction id `tx_id`: the id of a new transaction.
    pub(super) fn start(&mut self, tx_id: u32) -> XsResult<u32> {
        if tx_id != 0 || self.open.len() >= MAX_TRANSACTIONS {
            return Err(XsErrno::EBUSY);
        }
        let mut id = self.next_id;
        while id == 0 || self.open.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next_id = id.wrapping_add(1);
        self.open.insert(id, Transaction::default());
        Ok(id)
    }

    pub(super) fn contains(&self, id: u32) -> bool {
        self.open.contains_key(&id)
    }

    pub(super) fn get_mut(&mut self, id: u32) -> Option<&mut Transaction> {
        self.open.get_mut(&id)
    }

    /// Ends a transaction, handing it over to be committed or dropped.
    pub(super) fn remove(&mut self, id: u32) -> Option<Transaction> {
        self.open.remove(&id)
    }

    pub(super) fn clear(&mut self) {
        self.open.clear();
    }
}

/// The store as one request sees it: the committed tree, or a transaction's view of it.
pub(super) struct StoreView<'a> {
    pub(super) tree: &'a mut Tree,
    pub(super) tx: Option<&'a mut Transaction>,
}

impl StoreView<'_> {
    pub(super) fn get(&mut self, path: &str) -> Option<&Node> {
        match self.tx.as_deref_mut() {
            None => self.tree.get(path),
            Some(tx) => {
                let tree = &*self.tree;
                tx.accessed.entry(path.to_owned()).or_insert_with(|| tree.gen(path));
                match tx.overlay.get(path) {
                    Some(node) => node.as_ref(),
                    None => tree.get(path),
                }
            }
        }
    }

    pub(super) fn put(&mut self, path: &str, node: Option<Node>) {
        match self.tx.as_deref_mut() {
            None => match node {
                Some(n) => self.tree.store(path, n),
                None => self.tree.remove(path),
            },
            Some(tx) => {
                let tree = &*self.tree;
                tx.accessed.entry(path.to_owned()).or_insert_with(|| tree.gen(path));
                tx.overlay.insert(path.to_owned(), node);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{client, errno, ev, event, server, NONE};
    use super::MAX_TRANSACTIONS;
    use crate::{TxId, XsErrno};

    #[test]
    fn transaction_isolation_and_commit() {
        let sim = server("tx");
        let a = client(&sim, 0);
        let b = client(&sim, 0);
        a.write(NONE, "/t/x", b"0").expect("write");
        b.watch("/t", "t").expect("watch");
        assert_eq!(event(&b), ev("/t", "t"));
        b.watch("/mark", "m").expect("watch");
        assert_eq!(event(&b), ev("/mark", "m"));

        let tx = a.transaction_start().expect("start");
        assert_ne!(tx, NONE);
        a.write(tx, "/t/x", b"1").expect("tx write");
        a.write(tx, "/t/new", b"n").expect("tx create");
        assert_eq!(a.read(tx, "/t/x").expect("own view"), b"1");
        assert_eq!(a.directory(tx, "/t").expect("own view"), ["x", "new"]);
        assert_eq!(a.read(NONE, "/t/x").expect("outside"), b"0");
        assert_eq!(b.read(NONE, "/t/x").expect("outside"), b"0");
        assert_eq!(b.try_read(NONE, "/t/new").expect("outside"), None);
        assert_eq!(b.directory(NONE, "/t").expect("outside"), ["x"]);
        a.write(NONE, "/mark", b"1").expect("write");
        assert_eq!(event(&b), ev("/mark", "m"), "no events before the commit");

        a.transaction_end(tx, true).expect("commit");
        assert_eq!(b.read(NONE, "/t/x").expect("committed"), b"1");
        assert_eq!(b.read(NONE, "/t/new").expect("committed"), b"n");
        assert_eq!([event(&b), event(&b)], [ev("/t/x", "t"), ev("/t/new", "t")]);
        assert_eq!(errno(a.transaction_end(tx, true)), XsErrno::ENOENT, "the transaction is gone");

        // A transaction that removes, then is aborted.
        let tx = a.transaction_start().expect("start");
        a.rm(tx, "/t").expect("tx rm");
        assert_eq!(errno(a.read(tx, "/t/x")), XsErrno::ENOENT);
        a.write(tx, "/other", b"o").expect("tx write");
        a.transaction_end(tx, false).expect("abort");
        assert_eq!(a.read(NONE, "/t/x").expect("untouched"), b"1");
        assert_eq!(a.try_read(NONE, "/other").expect("read"), None);
        a.write(NONE, "/mark", b"2").expect("write");
        assert_eq!(event(&b), ev("/mark", "m"), "an aborted transaction fires nothing");

        assert_eq!(errno(a.read(TxId(999), "/t")), XsErrno::ENOENT);
        assert_eq!(errno(a.transaction_end(NONE, true)), XsErrno::ENOENT);
    }

    #[test]
    fn transaction_conflicts() {
        let sim = server("txconflict");
        let a = client(&sim, 0);
        let b = client(&sim, 0);
        a.write(NONE, "/t/x", b"0").expect("write");

        let tx = a.transaction_start().expect("start");
        assert_eq!(a.read(tx, "/t/x").expect("read"), b"0");
        b.write(NONE, "/t/x", b"2").expect("concurrent write");
        a.write(tx, "/t/y", b"3").expect("tx write");
        assert_eq!(errno(a.transaction_end(tx, true)), XsErrno::EAGAIN);
        assert_eq!(b.try_read(NONE, "/t/y").expect("read"), None, "a conflicting commit applies nothing");

        // A node found missing that appears meanwhile conflicts too.
        let tx = a.transaction_start().expect("start");
        assert_eq!(a.try_read(tx, "/t/later").expect("read"), None);
        b.write(NONE, "/t/later", b"1").expect("write");
        a.write(tx, "/elsewhere", b"1").expect("tx write");
        assert_eq!(errno(a.transaction_end(tx, true)), XsErrno::EAGAIN);

        // Changes to nodes the transaction never touched do not.
        let tx = a.transaction_start().expect("start");
        a.write(tx, "/t/x", b"3").expect("tx write");
        b.write(NONE, "/unrelated", b"1").expect("write");
        a.transaction_end(tx, true).expect("commit");
        assert_eq!(b.read(NONE, "/t/x").expect("read"), b"3");

        // Xenstore::transaction retries a conflicting commit.
        a.write(NONE, "/c", b"0").expect("write");
        let mut attempts = 0;
        a.transaction(|tx| {
            attempts += 1;
            let v: u32 = a.read_string(tx, "/c")?.parse().expect("number");
            if attempts == 1 {
                b.write(NONE, "/c", b"10")?;
            }
            a.write(tx, "/c", (v + 1).to_string().as_bytes())
        })
        .expect("transaction");
        assert_eq!(attempts, 2);
        assert_eq!(b.read(NONE, "/c").expect("read"), b"11");

        let open: Vec<TxId> = (0..MAX_TRANSACTIONS).map(|_| a.transaction_start().expect("start")).collect();
        assert_eq!(errno(a.transaction_start()), XsErrno::EBUSY);
        a.transaction_end(open[0], false).expect("abort");
        a.transaction_start().expect("start after an end");
    }
}
