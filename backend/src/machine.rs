//! The xenbus state machine of one device, as a pure function: what the backend observed in
//! xenstore (and of its own connection) in, the actions to take out. `backend.rs` reads the
//! [`View`], applies the [`Action`]s and does the I/O; the decisions are all here, tested
//! against libxl's and Linux's orders without xenstore.

use xvtpm_xen::XenbusState;

/// The frontend's `state` node as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Frontend {
    /// No such node (the domain is gone, or libxl removed its directory).
    Gone,
    /// A value that is not a xenbus state.
    Garbage,
    /// A state.
    Is(XenbusState),
}

/// What reconcile observed of one device whose backend directory exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct View {
    /// The device's configuration (uuid, frontend path and id) is valid.
    pub configured: bool,
    /// The backend `state` node (`None`: not a xenbus state).
    pub backend: Option<XenbusState>,
    /// `online` is not "0" (libxl always writes it; only an explicit 0 takes a device offline).
    pub online: bool,
    /// The frontend's state.
    pub frontend: Frontend,
    /// The last state this backend wrote.
    pub written: Option<XenbusState>,
    /// We closed the device for a protocol error; the frontend must close (or start over)
    /// before it may connect again.
    pub error_closed: bool,
    /// We serve in a driver domain (not dom0): removing an offline device is ours to do.
    pub driver_domain: bool,
}

/// What to do, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Drop the connection (if any).
    Disconnect,
    /// Write this state.
    Write(XenbusState),
    /// Map the frontend's ring and bind its port (or keep the connection if it is the same
    /// ring), then go Connected; a protocol error closes the device.
    Connect,
    /// Forget an earlier protocol error: the frontend closed or started over.
    ClearError,
    /// Driver domain: the device is offline; remove its directory once libxl saw Closed.
    NoteOffline,
}

/// The state to write when a device is first seen: fresh devices go to InitWait (libxl waits
/// 10 s for it); one left Connected or Closing by an earlier backend process is picked up
/// where it is, so a running guest keeps its TPM across a backend restart.
pub(crate) fn adopt(backend: Option<XenbusState>) -> Option<XenbusState> {
    matches!(backend, None | Some(XenbusState::Unknown | XenbusState::Initialising)).then_some(XenbusState::InitWait)
}

/// Whether [`step`] looks at the frontend's state for `v` (a configured device that is online
/// and not being closed by the toolstack); otherwise the frontend need not be read.
pub(crate) fn needs_frontend(v: &View) -> bool {
    v.configured && !closed_by_toolstack(v)
}

/// libxl (xl destroy / vtpm-detach) writes online=0 and Closing, then waits 10 s for Closed.
fn closed_by_toolstack(v: &View) -> bool {
    !v.online || (v.backend == Some(XenbusState::Closing) && v.written != Some(XenbusState::Closing))
}

/// The actions that bring a device in line with `v`.
pub(crate) fn step(v: &View) -> Vec<Action> {
    use Action::*;
    use XenbusState as S;
    let write_unless = |s: S, current: Option<S>| if current == Some(s) { None } else { Some(Write(s)) };
    if !v.configured {
        // Misconfigured: stay closed, but let the toolstack's removal complete.
        return write_unless(S::Closed, v.backend).into_iter().collect();
    }
    if closed_by_toolstack(v) {
        // An offline device stays closed, whatever the frontend does.
        let mut a = vec![Disconnect];
        a.extend(write_unless(S::Closed, v.backend));
        if !v.online && v.driver_domain {
            a.push(NoteOffline);
        }
        return a;
    }
    match v.frontend {
        Frontend::Garbage => vec![],
        // Frontend gone (domain destroyed): close our end.
        Frontend::Gone | Frontend::Is(S::Unknown) => {
            [Some(Disconnect), write_unless(S::Closed, v.written)].into_iter().flatten().collect()
        }
        Frontend::Is(S::Initialised | S::Connected) if v.error_closed => vec![],
        Frontend::Is(S::Initialised | S::Connected) => vec![Connect],
        Frontend::Is(S::Closing) => {
            [Some(Disconnect), write_unless(S::Closing, v.written)].into_iter().flatten().collect()
        }
        // A rebooting guest closes and comes back, or starts over without a clean close: wait
        // for it again.
        Frontend::Is(S::Closed | S::Initialising | S::InitWait) => {
            [Some(Disconnect), Some(ClearError), write_unless(S::InitWait, v.written)].into_iter().flatten().collect()
        }
        Frontend::Is(S::Reconfiguring | S::Reconfigured) => vec![],
    }
}

#[cfg(test)]
mod tests;
