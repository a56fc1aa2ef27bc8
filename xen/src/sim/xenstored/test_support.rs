//! What the tests of every part share: a server of their own and clients of it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::paths::home;
use super::{connect, SimXenstored};
use crate::{DomId, Perm, PermAccess, Result, TxId, WatchEvent, Xenstore, XsErrno};

pub(super) const WAIT: Duration = Duration::from_secs(10);
pub(super) const NONE: TxId = TxId::NONE;

pub(super) fn server(name: &str) -> SimXenstored {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("xsim-{}-{n}-{name}.sock", std::process::id()));
    SimXenstored::start(&path).expect("start xenstored")
}

pub(super) fn client(sim: &SimXenstored, domid: DomId) -> Xenstore {
    connect(sim.socket_path(), domid).expect("connect")
}

pub(super) fn errno<T: std::fmt::Debug>(r: Result<T>) -> XsErrno {
    r.expect_err("request should fail").xs_errno().expect("a xenstore error reply")
}

pub(super) fn event(xs: &Xenstore) -> WatchEvent {
    xs.next_event(Some(WAIT)).expect("events").expect("an event in time")
}

/// The next `n` events, in no particular order.
pub(super) fn events(xs: &Xenstore, n: usize) -> Vec<(String, String)> {
    let mut v: Vec<_> = (0..n).map(|_| event(xs)).map(|e| (e.path, e.token)).collect();
    v.sort();
    v
}

pub(super) fn pairs(evs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<_> = evs.iter().map(|(p, t)| (p.to_string(), t.to_string())).collect();
    v.sort();
    v
}

pub(super) fn ev(path: &str, token: &str) -> WatchEvent {
    WatchEvent { path: path.into(), token: token.into() }
}

pub(super) fn perm(access: PermAccess, domid: DomId) -> Perm {
    Perm { domid, access }
}

/// Gives domain `domid` a home it owns, as the toolstack does.
pub(super) fn make_home(dom0: &Xenstore, domid: DomId) {
    let h = home(domid);
    dom0.mkdir(NONE, &h).expect("mkdir home");
    dom0.set_perms(NONE, &h, &[perm(PermAccess::None, domid)]).expect("home perms");
}
