//! What a sandboxed vtpm's xenstore connection may touch. xenstored lets dom0 read and write
//! every node, so a vtpm in dom0 taken over by its guest could rewrite any guest's devices;
//! its requests therefore pass through the domain helper, which holds the real connection and
//! forwards only what this policy allows: reading its own device's backend directory and
//! writing the four nodes a backend writes there (not its `uuid`, which names the vTPM:
//! rewriting it would hand the vtpm another guest's TPM), reading its guest's frontend
//! directory, that guest's `vm` path and then that path's `start_time`, and the
//! `@releaseDomain` event. Domain ids and handles count only in their canonical decimal form.
//! Listings of the backend root, and watch events, show nothing of other devices.

use super::wire::{split_nul, Message, MsgType};
use crate::xenbus::{domain_path, vtpm_backend_root};
use crate::DomId;

/// The devices one vtpm serves: its own domain's backend root, one frontend domain and one
/// handle (either may be any, for a vtpm that looks for its device by uuid).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    root: String,
    frontend: Option<DomId>,
    handle: Option<u32>,
    /// The guest's `vm` path, once xenstored has told it: its `start_time` may be read.
    vm: Option<String>,
}

/// What a backend writes in its device directory (`backend.rs`).
const WRITTEN: [&str; 4] = ["state", "error", "ready", "feature-protocol-v2"];

/// The watch path of domain shut-downs and destructions.
const RELEASE: &str = "@releaseDomain";

impl Policy {
    /// The policy of a backend in domain `own` serving `frontend`'s device `handle`.
    pub fn new(own: DomId, frontend: Option<DomId>, handle: Option<u32>) -> Self {
        Policy { root: vtpm_backend_root(own), frontend, handle, vm: None }
    }

    /// Whether `part` is the frontend (or any, if not fixed), in canonical form: `05` and
    /// `5` are two nodes to xenstored but one device to a parser.
    fn is_frontend(&self, part: &str) -> bool {
        part.parse::<DomId>().is_ok_and(|d| d.to_string() == part && self.frontend.is_none_or(|f| f == d))
    }

    fn is_handle(&self, part: &str) -> bool {
        part.parse::<u32>().is_ok_and(|h| h.to_string() == part && self.handle.is_none_or(|x| x == h))
    }

    /// Whether `path` is the guest's `vm` node, whose value [`Policy::learn_vm`] takes.
    pub fn is_vm_node(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('/').collect();
        matches!(parts.as_slice(), ["", "local", "domain", f, "vm"] if self.is_frontend(f))
    }

    /// The guest's `vm` path, as xenstored answered a read of [`Policy::is_vm_node`].
    pub fn learn_vm(&mut self, value: &[u8]) {
        if let Ok(v) = std::str::from_utf8(value) {
            self.vm = Some(v.trim_end_matches('\0').to_string());
        }
    }

    /// The device directory itself.
    fn is_device_dir(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix(&self.root).and_then(|r| r.strip_prefix('/')) else { return false };
        let parts: Vec<&str> = rest.split('/').collect();
        matches!(parts.as_slice(), [f, h] if self.is_frontend(f) && self.is_handle(h))
    }

    /// A node of the device directory the backend writes.
    fn is_written(&self, path: &str) -> bool {
        path.rsplit_once('/').is_some_and(|(dir, leaf)| WRITTEN.contains(&leaf) && self.is_device_dir(dir))
    }

    /// The backend root itself, or one frontend's directory in it.
    fn is_listing(&self, path: &str) -> bool {
        match path.strip_prefix(&self.root) {
            Some("") => true,
            Some(rest) => rest.strip_prefix('/').is_some_and(|f| self.is_frontend(f)),
            None => false,
        }
    }

    /// The device's backend directory or a node below it.
    fn is_device(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix(&self.root).and_then(|r| r.strip_prefix('/')) else { return false };
        let mut parts = rest.split('/');
        matches!((parts.next(), parts.next()), (Some(f), Some(h)) if self.is_frontend(f) && self.is_handle(h))
    }

    /// The guest's frontend directory or a node below it, its `vm` node, a `start_time`.
    fn is_guest(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix("/local/domain/") else {
            // `<vm path>/start_time`: the guest's, once its `vm` node was read; any VM's for a
            // vtpm that serves any guest.
            return match (&self.vm, self.frontend) {
                (Some(vm), _) => path.strip_prefix(vm.as_str()) == Some("/start_time"),
                (None, None) => matches!(path.split('/').collect::<Vec<_>>().as_slice(), ["", "vm", _, "start_time"]),
                (None, Some(_)) => false,
            };
        };
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [f, "vm"] => self.is_frontend(f),
            [f, "device", "vtpm", h, ..] => self.is_frontend(f) && self.is_handle(h),
            _ => false,
        }
    }

    /// Whether the vtpm may send `msg`; `Err`: why not, for the log.
    pub fn allows(&self, msg: &Message) -> Result<(), String> {
        let ty = msg.msg_type().ok_or_else(|| format!("message type {}", msg.header.ty))?;
        let path = || -> Result<String, String> {
            let first = split_nul(&msg.payload).into_iter().next().unwrap_or_default();
            let p = String::from_utf8(first.to_vec()).map_err(|_| "a path that is not UTF-8".to_string())?;
            if p == RELEASE {
                return Ok(p);
            }
            let canonical = p.starts_with('/')
                && (p == "/" || !p.ends_with('/'))
                && !p.split('/').skip(1).any(|c| c.is_empty() || c == "." || c == "..");
            if canonical {
                Ok(p)
            } else {
                Err(format!("{ty:?} of {p:?}: only canonical absolute paths"))
            }
        };
        // Debug-quoted: a path is the vtpm's, and may hold a newline meant for the log.
        let refuse = |p: &str| Err(format!("{ty:?} of {p:?}"));
        match ty {
            MsgType::TransactionStart | MsgType::TransactionEnd | MsgType::GetDomainPath => Ok(()),
            MsgType::Read | MsgType::GetPerms => {
                let p = path()?;
                if self.is_device(&p) || self.is_guest(&p) {
                    Ok(())
                } else {
                    refuse(&p)
                }
            }
            MsgType::Directory => {
                let p = path()?;
                if self.is_listing(&p) || self.is_device(&p) || self.is_guest(&p) {
                    Ok(())
                } else {
                    refuse(&p)
                }
            }
            MsgType::Write => {
                let p = path()?;
                if self.is_written(&p) {
                    Ok(())
                } else {
                    refuse(&p)
                }
            }
            // Its own device's directory once the toolstack let go of it; never the guest's
            // directory, which may hold its other devices (libxl removes that).
            MsgType::Rm => {
                let p = path()?;
                if self.is_device_dir(&p) {
                    Ok(())
                } else {
                    refuse(&p)
                }
            }
            MsgType::Watch | MsgType::Unwatch => {
                let p = path()?;
                if p == RELEASE || p == self.root || self.is_device(&p) || self.is_guest(&p) {
                    Ok(())
                } else {
                    refuse(&p)
                }
            }
            other => Err(format!("{other:?}")),
        }
    }

    /// Whether a watch event on `path` may reach the vtpm: not one about another device.
    pub fn shows_event(&self, payload: &[u8]) -> bool {
        let first = split_nul(payload).into_iter().next().unwrap_or_default();
        let Ok(p) = std::str::from_utf8(first) else { return false };
        p == RELEASE || self.is_listing(p) || self.is_device(p) || self.is_guest(p)
    }

    /// The reply to a listing of `path`, showing only this vtpm's frontend and handle.
    pub fn filter_listing(&self, path: &str, reply: &mut Message) {
        if reply.msg_type() != Some(MsgType::Directory) || !self.is_listing(path) {
            return;
        }
        let keep = |name: &[u8]| {
            let n = String::from_utf8_lossy(name);
            if path == self.root {
                self.is_frontend(&n)
            } else {
                self.is_handle(&n)
            }
        };
        let kept: Vec<&[u8]> = split_nul(&reply.payload).into_iter().filter(|n| keep(n)).collect();
        let payload = super::wire::nul_terminated(&kept);
        reply.header.len = payload.len() as u32;
        reply.payload = payload;
    }

    /// The path a request names (its first string), for [`Policy::filter_listing`].
    pub fn request_path(msg: &Message) -> String {
        let first = split_nul(&msg.payload).into_iter().next().unwrap_or_default();
        String::from_utf8_lossy(first).into_owned()
    }
}

/// The guest's domain path, for messages.
pub fn describe(p: &Policy) -> String {
    match p.frontend {
        Some(f) => format!("{} and {}", p.root, domain_path(f)),
        None => p.root.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xenstore::wire::nul_terminated;

    fn msg(ty: MsgType, parts: &[&str]) -> Message {
        let parts: Vec<&[u8]> = parts.iter().map(|p| p.as_bytes()).collect();
        Message::new(ty, 1, 0, nul_terminated(&parts)).expect("message")
    }

    /// A vtpm serving guest 5's device 0 from dom0, against what a vtpm taken over by its
    /// guest would try.
    #[test]
    fn a_vtpm_reaches_its_own_device_and_guest_and_nothing_else() {
        let p = Policy::new(0, Some(5), Some(0));
        let root = "/local/domain/0/backend/vtpm";
        for (ty, path) in [
            (MsgType::Read, "/local/domain/0/backend/vtpm/5/0/uuid"),
            (MsgType::Write, "/local/domain/0/backend/vtpm/5/0/state"),
            (MsgType::Write, "/local/domain/0/backend/vtpm/5/0/feature-protocol-v2"),
            (MsgType::Write, "/local/domain/0/backend/vtpm/5/0/error"),
            (MsgType::Rm, "/local/domain/0/backend/vtpm/5/0"),
            (MsgType::Directory, root),
            (MsgType::Directory, "/local/domain/0/backend/vtpm/5"),
            (MsgType::Read, "/local/domain/5/device/vtpm/0/ring-ref"),
            (MsgType::Watch, "/local/domain/5/device/vtpm/0/state"),
            (MsgType::Watch, root),
            (MsgType::Watch, "@releaseDomain"),
            (MsgType::Read, "/local/domain/5/vm"),
            (MsgType::TransactionStart, ""),
        ] {
            assert_eq!(p.allows(&msg(ty, &[path, "x"])), Ok(()), "{ty:?} {path}");
        }
        // A VM's start time only once the guest's `vm` node named it.
        let vm_time = msg(MsgType::Read, &["/vm/8f2c0000-0000-4000-8000-000000000001/start_time"]);
        assert!(p.allows(&vm_time).is_err(), "before the guest's vm path is known");
        let mut p = p;
        assert!(p.is_vm_node("/local/domain/5/vm") && !p.is_vm_node("/local/domain/6/vm"));
        p.learn_vm(b"/vm/8f2c0000-0000-4000-8000-000000000001");
        assert_eq!(p.allows(&vm_time), Ok(()));
        let other_vm = msg(MsgType::Read, &["/vm/00000000-0000-4000-8000-000000000002/start_time"]);
        assert!(p.allows(&other_vm).is_err(), "another VM's start time");
        for (ty, path) in [
            // Another guest's device, backend and frontend.
            (MsgType::Write, "/local/domain/0/backend/vtpm/6/0/state"),
            (MsgType::Read, "/local/domain/0/backend/vtpm/6/0/uuid"),
            (MsgType::Read, "/local/domain/6/device/vtpm/0/ring-ref"),
            (MsgType::Rm, "/local/domain/0/backend/vtpm/6"),
            // The nodes that say which vTPM this is, or shape the directory.
            (MsgType::Write, "/local/domain/0/backend/vtpm/5/0/uuid"),
            (MsgType::Write, "/local/domain/0/backend/vtpm/5/0/frontend"),
            (MsgType::Mkdir, "/local/domain/0/backend/vtpm/5/0/x"),
            (MsgType::SetPerms, "/local/domain/0/backend/vtpm/5/0/state"),
            (MsgType::Rm, "/local/domain/0/backend/vtpm/5"),
            (MsgType::Rm, "/local/domain/0/backend/vtpm/5/0/uuid"),
            // Aliases of its own domain id and handle.
            (MsgType::Write, "/local/domain/0/backend/vtpm/05/0/state"),
            (MsgType::Write, "/local/domain/0/backend/vtpm/5/00/state"),
            (MsgType::Write, "/local/domain/0/backend/vtpm/+5/0/state"),
            (MsgType::DirectoryPart, "/local/domain/0/backend/vtpm"),
            // Its own guest's other handle, and other devices of its guest.
            (MsgType::Write, "/local/domain/0/backend/vtpm/5/1/state"),
            (MsgType::Read, "/local/domain/5/device/vbd/51712/ring-ref"),
            (MsgType::Write, "/local/domain/5/device/vtpm/0/state"),
            // Anything else of the host's.
            (MsgType::Write, "/local/domain/0/backend/vbd/5/51712/params"),
            (MsgType::Read, "/vm/8f2c0000-0000-4000-8000-000000000001/image/ostype"),
            (MsgType::Read, "/tool/xenstored/quota"),
            (MsgType::Rm, root),
            (MsgType::Watch, "/local/domain"),
            (MsgType::Watch, "@introduceDomain"),
            // Tricks with the path.
            (MsgType::Write, "/local/domain/0/backend/vtpm/5/0/../../6/0/state"),
            (MsgType::Write, "/local/domain/0/backend/vtpm//5/0/state"),
            (MsgType::Write, "local/domain/0/backend/vtpm/5/0/state"),
            (MsgType::Read, "/local/domain/0/backend/vtpm/5/"),
            // The toolstack's and xenstored's own requests.
            (MsgType::Introduce, "1"),
            (MsgType::Release, "5"),
            (MsgType::SetTarget, "5"),
            (MsgType::ResetWatches, ""),
            (MsgType::Control, "log"),
        ] {
            assert!(p.allows(&msg(ty, &[path, "x"])).is_err(), "{ty:?} {path} must be refused");
        }
    }

    #[test]
    fn listings_and_events_show_only_its_device() {
        let p = Policy::new(0, Some(5), Some(0));
        let root = "/local/domain/0/backend/vtpm";
        let mut reply = msg(MsgType::Directory, &["3", "5", "12"]);
        p.filter_listing(root, &mut reply);
        assert_eq!(reply.payload, b"5\0");
        assert_eq!(reply.header.len, 2);
        let mut reply = msg(MsgType::Directory, &["0", "1"]);
        p.filter_listing("/local/domain/0/backend/vtpm/5", &mut reply);
        assert_eq!(reply.payload, b"0\0");
        // A listing of its own device's nodes is left whole.
        let mut reply = msg(MsgType::Directory, &["uuid", "state"]);
        p.filter_listing("/local/domain/0/backend/vtpm/5/0", &mut reply);
        assert_eq!(reply.payload, b"uuid\0state\0");
        let ev = |path: &str| nul_terminated(&[path.as_bytes(), b"tok"]);
        assert!(p.shows_event(&ev("/local/domain/0/backend/vtpm/5/0/state")));
        assert!(p.shows_event(&ev("@releaseDomain")));
        assert!(p.shows_event(&ev(root)));
        assert!(!p.shows_event(&ev("/local/domain/0/backend/vtpm/6/0/state")));
        assert!(!p.shows_event(&ev("/local/domain/0/backend/vtpm/6")));
        // One that serves any guest (by uuid) sees every device of the root, nothing else.
        let any = Policy::new(0, None, None);
        assert_eq!(any.allows(&msg(MsgType::Read, &["/local/domain/0/backend/vtpm/6/0/uuid"])), Ok(()));
        assert_eq!(any.allows(&msg(MsgType::Read, &["/vm/00000000-0000-4000-8000-000000000002/start_time"])), Ok(()));
        assert!(any.allows(&msg(MsgType::Read, &["/local/domain/0/backend/vbd/6/0/params"])).is_err());
        assert!(describe(&p).contains("/local/domain/5"));
    }
}
