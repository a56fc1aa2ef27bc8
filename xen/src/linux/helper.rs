//! The domain helper: a small process forked from a vtpm before it enters its sandbox, holding
//! what the sandboxed vtpm must not: `/dev/xen/privcmd` (a privcmd handle in dom0 can make any
//! hypercall dom0 can, e.g. map any domain's memory) and the xenstore connection (xenstored
//! lets dom0 write every node). It answers one question, what the hypervisor says of a
//! domain, only about the domains it was given; and it relays the vtpm's xenstore requests
//! that its [`Policy`] allows, refusing the rest with EACCES. It runs as the vtpm's uid under
//! its own, narrower system-call filter, single-threaded.
//!
//! The domain exchange on their socket pair: a request is a domain id (2 bytes,
//! little-endian); a reply is 5 bytes, a tag (0: no such domain, 1: the domain's flags
//! follow, 2: not a domain this helper answers about, 3: the hypervisor refused) and
//! `XEN_DOMINF_*` flags (LE). The xenstore exchange is xenstored's own wire protocol, on a
//! second socket pair.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use super::privcmd::Privcmd;
use crate::xenstore::guard::Policy;
use crate::xenstore::wire::{error_payload, Message, MsgType};
use crate::{DomId, DomainInfo, Error, Result, XsErrno};

const NONE: u8 = 0;
const FOUND: u8 = 1;
const NOT_ALLOWED: u8 = 2;
const FAILED: u8 = 3;

/// The vtpm's end of the helper.
#[derive(Debug)]
pub struct DomainHelper {
    sock: Mutex<UnixStream>,
    pid: i32,
}

impl DomainHelper {
    /// Forks the helper, which opens privcmd (and, given a `policy`, xenstored's socket), runs
    /// `confine` (to drop its privileges; an error ends it) and answers about `allowed` domains
    /// only (`None`: any). With a policy, the second value is the vtpm's xenstore connection
    /// (for `Xenstore::from_unix`). Call it while the process has one thread: the child runs on
    /// after fork().
    pub fn spawn(
        allowed: Option<Vec<DomId>>,
        policy: Option<Policy>,
        confine: &dyn Fn() -> io::Result<()>,
    ) -> Result<(Self, Option<UnixStream>)> {
        // fork() copies only the calling thread: locks other threads held stay held in the
        // child. Refused rather than trusted.
        let threads = std::fs::read_dir("/proc/self/task").map(Iterator::count).unwrap_or(0);
        if threads != 1 {
            return Err(Error::io(
                "fork the domain helper",
                io::Error::other(format!("the process has {threads} threads; the helper must be forked before any")),
            ));
        }
        let pair = || UnixStream::pair().map_err(|e| Error::io("a socket pair for the domain helper", e));
        let (ours, theirs) = pair()?;
        let xs = policy.map(|p| pair().map(|(vtpm, helper)| (vtpm, helper, p))).transpose()?;
        // SAFETY: fork() in a single-threaded process (checked above): the child owns a copy of
        // everything and runs only this module's code until it exits.
        match unsafe { libc::fork() } {
            -1 => Err(Error::io("fork the domain helper", io::Error::last_os_error())),
            0 => {
                drop(ours);
                let relay = xs.map(|(vtpm, helper, p)| {
                    drop(vtpm);
                    (helper, p)
                });
                let code = match serve(theirs, relay, allowed.as_deref(), confine) {
                    Ok(()) => 0,
                    Err(e) => {
                        log::error!("domain helper: {e}");
                        1
                    }
                };
                // SAFETY: _exit ends the child without running the parent's atexit handlers or
                // flushing buffers it shares with the parent.
                unsafe { libc::_exit(code) }
            }
            pid => {
                drop(theirs);
                let vtpm_xs = xs.map(|(vtpm, _helper, _)| vtpm);
                Ok((DomainHelper { sock: Mutex::new(ours), pid }, vtpm_xs))
            }
        }
    }

    /// The helper's process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// What the hypervisor says of domain `domid`, through the helper.
    pub fn domain_info(&self, domid: DomId) -> Result<Option<DomainInfo>> {
        let mut sock = self.sock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut reply = [0u8; 5];
        sock.write_all(&domid.to_le_bytes())
            .and_then(|()| sock.read_exact(&mut reply))
            .map_err(|e| Error::io("ask the domain helper", e))?;
        let flags = u32::from_le_bytes([reply[1], reply[2], reply[3], reply[4]]);
        match reply[0] {
            NONE => Ok(None),
            FOUND => Ok(Some(DomainInfo::from_flags(flags))),
            NOT_ALLOWED => Err(Error::io(
                format!("domain {domid}"),
                io::Error::new(io::ErrorKind::PermissionDenied, "not a domain this vtpm may ask about"),
            )),
            _ => Err(Error::io(
                format!("XEN_DOMCTL_getdomaininfo of domain {domid}"),
                io::Error::other("the hypervisor refused (the domain helper logged why)"),
            )),
        }
    }
}

/// The child: answers and relays until the vtpm closes its end.
fn serve(
    mut sock: UnixStream,
    relay: Option<(UnixStream, Policy)>,
    allowed: Option<&[DomId]>,
    confine: &dyn Fn() -> io::Result<()>,
) -> io::Result<()> {
    let privcmd = Privcmd::open().map_err(io::Error::other)?;
    let mut relay = match relay {
        Some((client, policy)) => Some(Relay {
            client,
            server: xenstored().map_err(io::Error::other)?,
            policy,
            listings: BTreeMap::new(),
            vm_reads: BTreeSet::new(),
        }),
        None => None,
    };
    confine()?;
    loop {
        let mut fds = vec![libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        if let Some(r) = &relay {
            fds.push(libc::pollfd { fd: r.client.as_raw_fd(), events: libc::POLLIN, revents: 0 });
            fds.push(libc::pollfd { fd: r.server.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let ready = |i: usize| fds.get(i).is_some_and(|f| f.revents != 0);
        if ready(0) && !answer(&mut sock, &privcmd, allowed)? {
            return Ok(());
        }
        if let Some(r) = relay.as_mut() {
            if ready(1) && !r.on_request()? {
                return Ok(());
            }
            if ready(2) {
                r.on_answer()?;
            }
        }
    }
}

/// A new connection to xenstored, as a plain file (no reader thread: the helper has one
/// thread): its socket, else the kernel's xenbus device.
fn xenstored() -> Result<File> {
    match UnixStream::connect(super::XENSTORED_SOCKET) {
        Ok(s) => Ok(File::from(OwnedFd::from(s))),
        Err(_) => File::options()
            .read(true)
            .write(true)
            .open(super::XENBUS_DEVICE)
            .map_err(|e| Error::io(format!("open {}", super::XENBUS_DEVICE), e)),
    }
}

/// The vtpm's xenstore requests, checked, and xenstored's answers and events, filtered.
struct Relay {
    client: UnixStream,
    server: File,
    policy: Policy,
    /// Listings in flight (request id to path), whose replies are filtered.
    listings: BTreeMap<u32, String>,
    /// Reads of the guest's `vm` node in flight, whose answers the policy learns.
    vm_reads: BTreeSet<u32>,
}

impl Relay {
    /// One request of the vtpm: forwarded, or refused with EACCES. `false`: the vtpm is gone.
    fn on_request(&mut self) -> io::Result<bool> {
        let Some(msg) = Message::read_from(&mut self.client).map_err(io::Error::other)? else { return Ok(false) };
        let id = msg.header.req_id;
        // A request id already in flight would make its answer ambiguous (which one to filter).
        let checked = if self.listings.contains_key(&id) || self.vm_reads.contains(&id) {
            Err(format!("request id {id} already in flight"))
        } else {
            self.policy.allows(&msg)
        };
        match checked {
            Ok(()) => {
                let path = Policy::request_path(&msg);
                match msg.msg_type() {
                    Some(MsgType::Directory) => {
                        self.listings.insert(id, path);
                    }
                    Some(MsgType::Read) if self.policy.is_vm_node(&path) => {
                        self.vm_reads.insert(id);
                    }
                    _ => {}
                }
                msg.write_to(&mut self.server).map_err(io::Error::other)?;
            }
            Err(why) => {
                log::warn!("xenstore: refused {why} (not this vtpm's device)");
                let reply =
                    Message::new(MsgType::Error, msg.header.req_id, msg.header.tx_id, error_payload(XsErrno::EACCES))
                        .map_err(io::Error::other)?;
                reply.write_to(&mut self.client).map_err(io::Error::other)?;
            }
        }
        Ok(true)
    }

    /// One message of xenstored: a reply (a listing filtered) or a watch event (dropped if it
    /// is about another device).
    fn on_answer(&mut self) -> io::Result<()> {
        let Some(mut msg) = Message::read_from(&mut self.server).map_err(io::Error::other)? else {
            return Err(io::Error::other("xenstored closed the connection"));
        };
        let id = msg.header.req_id;
        if msg.msg_type() == Some(MsgType::WatchEvent) {
            if !self.policy.shows_event(&msg.payload) {
                return Ok(());
            }
        } else if let Some(path) = self.listings.remove(&id) {
            self.policy.filter_listing(&path, &mut msg);
        } else if self.vm_reads.remove(&id) && msg.msg_type() == Some(MsgType::Read) {
            self.policy.learn_vm(&msg.payload);
        }
        msg.write_to(&mut self.client).map_err(io::Error::other)
    }
}

/// One domain question: `false` once the vtpm has closed its end.
fn answer(sock: &mut UnixStream, privcmd: &Privcmd, allowed: Option<&[DomId]>) -> io::Result<bool> {
    let mut req = [0u8; 2];
    match sock.read_exact(&mut req) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e),
    }
    let domid = u16::from_le_bytes(req);
    let (tag, flags) = if allowed.is_some_and(|a| !a.contains(&domid)) {
        log::warn!("domain helper: asked about domain {domid}, which this vtpm does not serve; refused");
        (NOT_ALLOWED, 0)
    } else {
        match privcmd.domain_info(domid) {
            Ok(None) => (NONE, 0),
            Ok(Some(info)) => (FOUND, info.to_flags()),
            Err(e) => {
                log::warn!("domain helper: {e}");
                (FAILED, 0)
            }
        }
    };
    let mut reply = [tag, 0, 0, 0, 0];
    reply[1..].copy_from_slice(&flags.to_le_bytes());
    sock.write_all(&reply)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xenstore::wire::nul_terminated;

    fn msg(ty: MsgType, req: u32, parts: &[&str]) -> Message {
        let parts: Vec<&[u8]> = parts.iter().map(|p| p.as_bytes()).collect();
        Message::new(ty, req, 0, nul_terminated(&parts)).expect("message")
    }

    /// The relay between a vtpm taken over by its guest and xenstored (a socket standing in
    /// for it): what the policy refuses never reaches xenstored and is answered EACCES; what
    /// it allows goes through; listings and events of other devices are cut.
    #[test]
    fn the_relay_forwards_the_vtpms_own_requests_and_refuses_the_rest() {
        let (mut vtpm, client) = UnixStream::pair().expect("pair");
        let (mut xenstored, server) = UnixStream::pair().expect("pair");
        xenstored.set_nonblocking(true).expect("nonblocking");
        let mut r = Relay {
            client,
            server: File::from(OwnedFd::from(server)),
            policy: Policy::new(0, Some(5), Some(0)),
            listings: BTreeMap::new(),
            vm_reads: BTreeSet::new(),
        };
        // Another guest's device: refused, nothing sent on.
        msg(MsgType::Write, 7, &["/local/domain/0/backend/vtpm/6/0/state", "6"]).write_to(&mut vtpm).expect("send");
        assert!(r.on_request().expect("relay"));
        let refused = Message::read_from(&mut vtpm).expect("read").expect("a reply");
        assert_eq!((refused.msg_type(), refused.header.req_id), (Some(MsgType::Error), 7));
        assert_eq!(refused.payload, b"EACCES\0");
        assert!(Message::read_from(&mut xenstored).is_err(), "the refused write reached xenstored");
        // Its own root listed: forwarded, and the answer shows only its guest.
        msg(MsgType::Directory, 8, &["/local/domain/0/backend/vtpm"]).write_to(&mut vtpm).expect("send");
        assert!(r.on_request().expect("relay"));
        xenstored.set_nonblocking(false).expect("blocking");
        let forwarded = Message::read_from(&mut xenstored).expect("read").expect("forwarded");
        assert_eq!(forwarded.header.req_id, 8);
        msg(MsgType::Directory, 8, &["3", "5", "6"]).write_to(&mut xenstored).expect("answer");
        r.on_answer().expect("relay");
        assert_eq!(Message::read_from(&mut vtpm).expect("read").expect("reply").payload, b"5\0");
        // The guest's vm node read: its start time may be read next, another VM's not.
        msg(MsgType::Read, 9, &["/local/domain/5/vm"]).write_to(&mut vtpm).expect("send");
        assert!(r.on_request().expect("relay"));
        assert_eq!(Message::read_from(&mut xenstored).expect("read").expect("forwarded").header.req_id, 9);
        Message::new(MsgType::Read, 9, 0, b"/vm/abc".to_vec()).expect("msg").write_to(&mut xenstored).expect("answer");
        r.on_answer().expect("relay");
        assert_eq!(Message::read_from(&mut vtpm).expect("read").expect("reply").payload, b"/vm/abc");
        msg(MsgType::Read, 10, &["/vm/abc/start_time"]).write_to(&mut vtpm).expect("send");
        assert!(r.on_request().expect("relay"));
        assert_eq!(Message::read_from(&mut xenstored).expect("read").expect("forwarded").header.req_id, 10);
        msg(MsgType::Read, 11, &["/vm/other/start_time"]).write_to(&mut vtpm).expect("send");
        assert!(r.on_request().expect("relay"));
        assert_eq!(Message::read_from(&mut vtpm).expect("read").expect("refused").msg_type(), Some(MsgType::Error));
        // A watch event about another device is dropped; one about its own goes through.
        msg(MsgType::WatchEvent, 0, &["/local/domain/0/backend/vtpm/6/0/state", "t"])
            .write_to(&mut xenstored)
            .expect("event");
        msg(MsgType::WatchEvent, 0, &["/local/domain/0/backend/vtpm/5/0/state", "t"])
            .write_to(&mut xenstored)
            .expect("event");
        r.on_answer().expect("relay");
        r.on_answer().expect("relay");
        let ev = Message::read_from(&mut vtpm).expect("read").expect("event");
        assert!(
            ev.payload.starts_with(b"/local/domain/0/backend/vtpm/5/0/state"),
            "{:?}",
            String::from_utf8_lossy(&ev.payload)
        );
        // The vtpm gone: the relay ends.
        drop(vtpm);
        assert!(!r.on_request().expect("relay"));
    }

    /// The test harness runs tests on threads: a fork here is refused, never risked.
    #[test]
    fn a_process_with_threads_is_not_forked() {
        let err = DomainHelper::spawn(Some(vec![3]), None, &|| Ok(())).map(drop).expect_err("threads");
        assert!(err.to_string().contains("threads"), "{err}");
    }
}
