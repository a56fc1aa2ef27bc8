//! The state machine against the orders in which libxl, Linux's xen-tpmfront and a restarted
//! backend change a device's nodes: single steps as a table, then whole lives on a small model
//! that applies the actions as `backend.rs` does.

use super::*;
use Action::*;
use XenbusState as S;

fn view(backend: S, written: Option<S>, frontend: Frontend) -> View {
    View {
        configured: true,
        backend: Some(backend),
        online: true,
        frontend,
        written,
        error_closed: false,
        driver_domain: false,
    }
}

#[test]
fn one_step_each() {
    let fe = Frontend::Is;
    let rows: Vec<(&str, View, Vec<Action>)> = vec![
        (
            "frontend initialising, we wait",
            view(S::InitWait, Some(S::InitWait), fe(S::Initialising)),
            vec![Disconnect, ClearError],
        ),
        ("frontend published its ring", view(S::InitWait, Some(S::InitWait), fe(S::Initialised)), vec![Connect]),
        ("frontend connected", view(S::Connected, Some(S::Connected), fe(S::Connected)), vec![Connect]),
        (
            "frontend closing",
            view(S::Connected, Some(S::Connected), fe(S::Closing)),
            vec![Disconnect, Write(S::Closing)],
        ),
        ("frontend closing again", view(S::Closing, Some(S::Closing), fe(S::Closing)), vec![Disconnect]),
        (
            "frontend closed: wait for a reboot",
            view(S::Closing, Some(S::Closing), fe(S::Closed)),
            vec![Disconnect, ClearError, Write(S::InitWait)],
        ),
        (
            "frontend started over",
            view(S::Connected, Some(S::Connected), fe(S::InitWait)),
            vec![Disconnect, ClearError, Write(S::InitWait)],
        ),
        ("frontend gone", view(S::Connected, Some(S::Connected), Frontend::Gone), vec![Disconnect, Write(S::Closed)]),
        ("frontend unknown", view(S::Closed, Some(S::Closed), fe(S::Unknown)), vec![Disconnect]),
        ("frontend garbage", view(S::Connected, Some(S::Connected), Frontend::Garbage), vec![]),
        ("frontend reconfiguring", view(S::Connected, Some(S::Connected), fe(S::Reconfiguring)), vec![]),
        (
            "libxl writes Closing",
            view(S::Closing, Some(S::Connected), fe(S::Connected)),
            vec![Disconnect, Write(S::Closed)],
        ),
        (
            "offline, closed",
            View { online: false, ..view(S::Closed, Some(S::Closed), fe(S::Connected)) },
            vec![Disconnect],
        ),
        (
            "offline in a driver domain",
            View { online: false, driver_domain: true, ..view(S::Closing, None, fe(S::Connected)) },
            vec![Disconnect, Write(S::Closed), NoteOffline],
        ),
        (
            "after a protocol error",
            View { error_closed: true, ..view(S::Closing, Some(S::Closing), fe(S::Connected)) },
            vec![],
        ),
        (
            "misconfigured",
            View { configured: false, ..view(S::InitWait, None, Frontend::Gone) },
            vec![Write(S::Closed)],
        ),
        ("misconfigured and closed", View { configured: false, ..view(S::Closed, None, Frontend::Gone) }, vec![]),
    ];
    for (what, v, want) in rows {
        assert_eq!(step(&v), want, "{what}: {v:?}");
    }
    assert_eq!(adopt(None), Some(S::InitWait));
    assert_eq!(adopt(Some(S::Initialising)), Some(S::InitWait));
    assert_eq!(adopt(Some(S::Connected)), None);
    assert_eq!(adopt(Some(S::Closing)), None);
}

/// One device as xenstore and the backend hold it.
#[derive(Debug)]
struct Device {
    v: View,
    connected: bool,
    /// The next Connect finds a protocol error (no feature-protocol-v2, a ring that does not map).
    broken_ring: bool,
    noted_offline: bool,
    /// Every state the backend wrote, in order.
    writes: Vec<S>,
}

impl Device {
    /// libxl created the device (state Initialising) and the backend found it.
    fn created(driver_domain: bool) -> Self {
        Self::adopted(S::Initialising, driver_domain)
    }

    /// A (re)started backend finds a device whose backend state is `backend`.
    fn adopted(backend: S, driver_domain: bool) -> Self {
        let mut d = Device {
            v: View { driver_domain, ..view(backend, None, Frontend::Is(S::Initialising)) },
            connected: false,
            broken_ring: false,
            noted_offline: false,
            writes: vec![],
        };
        if let Some(s) = adopt(Some(backend)) {
            d.write(s);
        }
        d
    }

    fn write(&mut self, s: S) {
        self.v.backend = Some(s);
        self.v.written = Some(s);
        self.writes.push(s);
    }

    /// The frontend's state changes (`None`: its directory goes), then the backend reconciles.
    fn frontend(&mut self, fe: Option<S>) -> &mut Self {
        self.v.frontend = fe.map_or(Frontend::Gone, Frontend::Is);
        self.reconcile()
    }

    /// libxl takes the device down: online=0, then Closing.
    fn toolstack_close(&mut self) -> &mut Self {
        self.v.online = false;
        self.v.backend = Some(S::Closing);
        self.reconcile()
    }

    fn reconcile(&mut self) -> &mut Self {
        for a in step(&self.v) {
            match a {
                Disconnect => self.connected = false,
                Write(s) => self.write(s),
                ClearError => self.v.error_closed = false,
                NoteOffline => self.noted_offline = true,
                Connect if std::mem::take(&mut self.broken_ring) => {
                    self.v.error_closed = true;
                    self.write(S::Closing);
                }
                Connect if self.connected => {}
                Connect => {
                    self.connected = true;
                    self.write(S::Connected);
                }
            }
        }
        self
    }
}

/// Linux's xen-tpmfront: Initialising, then its keys and Initialised, then Connected once it
/// sees ours.
fn linux_connects(d: &mut Device) {
    d.frontend(Some(S::Initialising)).frontend(Some(S::Initialised)).frontend(Some(S::Connected));
}

#[test]
fn create_connects_once() {
    let mut d = Device::created(false);
    linux_connects(&mut d);
    assert!(d.connected);
    assert_eq!(d.writes, [S::InitWait, S::Connected]);
}

#[test]
fn xl_destroy_closes_and_stays_closed() {
    for driver_domain in [false, true] {
        let mut d = Device::created(driver_domain);
        linux_connects(&mut d);
        // xl destroy pauses the guest: its frontend is still Connected when libxl closes.
        d.toolstack_close();
        assert!(!d.connected);
        assert_eq!(d.v.backend, Some(S::Closed));
        assert_eq!(d.noted_offline, driver_domain, "only a driver domain removes the directory");
        // Then libxl removes the frontend's directory; nothing reconnects.
        d.frontend(None).frontend(Some(S::Connected));
        assert!(!d.connected);
        assert_eq!(d.writes, [S::InitWait, S::Connected, S::Closed]);
    }
}

#[test]
fn vtpm_detach_under_a_running_guest() {
    let mut d = Device::created(false);
    linux_connects(&mut d);
    d.toolstack_close();
    // The guest's driver sees Closed and closes; the device stays offline and Closed.
    d.frontend(Some(S::Closing)).frontend(Some(S::Closed));
    assert!(!d.connected);
    assert_eq!(d.writes, [S::InitWait, S::Connected, S::Closed]);
}

#[test]
fn a_rebooting_guest_reconnects() {
    let mut d = Device::created(false);
    linux_connects(&mut d);
    d.frontend(Some(S::Closing)).frontend(Some(S::Closed));
    assert_eq!(d.v.backend, Some(S::InitWait));
    linux_connects(&mut d);
    assert!(d.connected);
    assert_eq!(d.writes, [S::InitWait, S::Connected, S::Closing, S::InitWait, S::Connected]);
    // A reboot without a clean close: the frontend starts over from Initialising.
    d.frontend(Some(S::Initialising));
    assert!(!d.connected);
    linux_connects(&mut d);
    assert!(d.connected);
}

#[test]
fn a_flapping_frontend_costs_no_extra_writes() {
    let mut d = Device::created(false);
    for _ in 0..50 {
        d.frontend(Some(S::Closed)).frontend(Some(S::Closed)).frontend(Some(S::InitWait));
    }
    assert_eq!(d.writes, [S::InitWait], "InitWait is written once");
    linux_connects(&mut d);
    assert!(d.connected);
}

#[test]
fn a_restarted_backend_adopts_a_connected_device() {
    // The old process left Connected; the guest is still Connected and must keep its TPM.
    let mut d = Device::adopted(S::Connected, false);
    assert!(d.writes.is_empty(), "no InitWait: the guest would see its TPM go");
    d.frontend(Some(S::Connected));
    assert!(d.connected);
    assert_eq!(d.writes, [S::Connected]);
}

#[test]
fn a_protocol_error_holds_until_the_frontend_closes() {
    let mut d = Device::created(false);
    d.broken_ring = true;
    d.frontend(Some(S::Initialised));
    assert_eq!(d.v.backend, Some(S::Closing));
    // The frontend insists: nothing is mapped again until it closes.
    d.frontend(Some(S::Connected)).frontend(Some(S::Initialised));
    assert!(!d.connected);
    d.frontend(Some(S::Closed));
    linux_connects(&mut d);
    assert!(d.connected);
    assert_eq!(d.writes, [S::InitWait, S::Closing, S::InitWait, S::Connected]);
}

#[test]
fn the_frontend_is_read_only_when_it_decides() {
    let fe = Frontend::Is(S::Connected);
    assert!(needs_frontend(&view(S::Connected, Some(S::Connected), fe)));
    assert!(needs_frontend(&view(S::Closing, Some(S::Closing), fe)), "our own Closing");
    assert!(!needs_frontend(&view(S::Closing, Some(S::Connected), fe)), "the toolstack's Closing");
    assert!(!needs_frontend(&View { online: false, ..view(S::Closed, Some(S::Closed), fe) }));
    assert!(!needs_frontend(&View { configured: false, ..view(S::InitWait, None, fe) }));
    // Where it is not read, it does not matter.
    for v in [
        view(S::Closing, Some(S::Connected), fe),
        View { online: false, driver_domain: true, ..view(S::Closed, Some(S::Closed), fe) },
        View { configured: false, ..view(S::InitWait, None, fe) },
    ] {
        assert_eq!(step(&v), step(&View { frontend: Frontend::Gone, ..v }), "{v:?}");
    }
}
