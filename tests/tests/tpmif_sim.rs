//! tpmback and tpmfront in separate processes on the simulated Xen.

use std::path::Path;
use std::time::Duration;

use xvtpm_tests::{run_frontend, BackendProcess, RawFrontend};
use xvtpm_xen::sim::{toolstack, SimHost};
use xvtpm_xen::{TxId, Xen, XenbusState, Xenstore};

const BACKEND: &str = env!("CARGO_BIN_EXE_xvtpm-sim-backend");
const FRONTEND: &str = env!("CARGO_BIN_EXE_xvtpm-sim-frontend");
const SEC: Duration = Duration::from_secs(1);

fn uuid(n: u16) -> String {
    format!("6f1d3a2c-0000-4000-8000-{n:012x}")
}

struct Env {
    host: SimHost,
    xs: Xenstore,
}

impl Env {
    fn new() -> Env {
        let _ = env_logger::builder().is_test(true).try_init();
        let host = SimHost::temp().expect("sim");
        let xs = host.xen(0).xenstore().expect("dom0 xenstore");
        Env { host, xs }
    }

    fn dir(&self) -> &Path {
        self.host.dir()
    }

    /// A guest `domid` with a vtpm device served by dom0, as `xl create` makes it.
    fn guest(&self, domid: u16) {
        toolstack::add_domain(&self.xs, domid, &format!("guest{domid}")).expect("domain");
        toolstack::add_vtpm(&self.xs, domid, 0, 0, &uuid(domid)).expect("vtpm");
    }

    fn backend(&self) -> BackendProcess {
        BackendProcess::start(Path::new(BACKEND), self.dir(), 0, &[]).expect("backend")
    }

    fn be_state(&self, domid: u16) -> Option<XenbusState> {
        let p = format!("/local/domain/0/backend/vtpm/{domid}/0/state");
        self.xs.try_read(TxId::NONE, &p).ok()?.and_then(|v| XenbusState::parse(&p, &v).ok())
    }

    fn wait_be_state(&self, domid: u16, want: XenbusState) -> bool {
        toolstack::wait_for_state(&self.xs, &format!("/local/domain/0/backend/vtpm/{domid}/0/state"), want, 10 * SEC)
    }

    fn frontend(&self, domid: u16, args: &[&str]) -> (bool, String, String) {
        run_frontend(Path::new(FRONTEND), self.dir(), domid, 0, args).expect("frontend process")
    }

    fn assert_frontend_ok(&self, domid: u16, args: &[&str], expect: &str) {
        let (ok, out, err) = self.frontend(domid, args);
        assert!(ok && out.contains(expect), "frontend {domid} {args:?} failed:\nstdout: {out}\nstderr: {err}");
    }
}

#[test]
fn handshake_and_1000_random_commands_echoed() {
    let env = Env::new();
    env.guest(1);
    let be = env.backend();
    assert!(env.wait_be_state(1, XenbusState::InitWait), "backend reaches InitWait for libxl");
    let feat = env.xs.read(TxId::NONE, "/local/domain/0/backend/vtpm/1/0/feature-protocol-v2").expect("feature");
    assert_eq!(feat, b"1");
    env.assert_frontend_ok(1, &["echo", "--count", "1000", "--seed", "42"], "OK echoed 1000");
    assert_eq!(env.xs.read(TxId::NONE, "/local/domain/0/backend/vtpm/1/0/ready").expect("ready"), b"1");
    // The frontend closed: the backend waits for the guest to come back.
    assert!(env.wait_be_state(1, XenbusState::InitWait), "back to InitWait after close");
    // xl destroy: libxl writes Closing and waits for Closed.
    let closed = toolstack::remove_vtpm(&env.xs, 1, 0, 0, 10 * SEC).expect("remove");
    assert!(closed, "backend answered Closing with Closed");
    assert!(be.wait_log("vtpm 1/0: device removed", 5 * SEC), "{}", be.log());
    assert!(!be.log().contains("panicked"));
}

#[test]
fn oversized_command_is_refused_at_the_frontend() {
    let env = Env::new();
    env.guest(1);
    let _be = env.backend();
    env.assert_frontend_ok(1, &["too-large"], "OK too-large");
}

#[test]
fn slow_command_is_cancelled() {
    let env = Env::new();
    env.guest(1);
    let be = env.backend();
    env.assert_frontend_ok(1, &["cancel"], "OK cancel");
    assert!(be.wait_log("slow command cancelled", 5 * SEC), "handler saw the cancel:\n{}", be.log());
}

#[test]
fn frontend_close_and_reopen_reconnects() {
    let env = Env::new();
    env.guest(1);
    let _be = env.backend();
    env.assert_frontend_ok(1, &["reopen", "--cycles", "4"], "OK reopen 4");
    // A second process (the rebooted guest) connects again.
    env.assert_frontend_ok(1, &["echo", "--count", "20"], "OK echoed 20");
}

#[test]
fn a_backend_serves_as_many_devices_as_the_watch_quota_allows() {
    // xenstored allows 128 watches per connection. A backend of every device holds two,
    // whatever their number (vtpmmgr's many_devices.rs runs 1,000); it used to hold one per
    // device, and two per device for a handler that follows suspends.
    let env = Env::new();
    const N: u16 = 120;
    for d in 1..=N {
        env.guest(d);
    }
    let be = env.backend();
    for d in [1, N / 2, N] {
        assert!(env.wait_be_state(d, XenbusState::InitWait), "device {d} not announced; {}", be.log());
    }
    env.assert_frontend_ok(N, &["echo", "--count", "5"], "OK echoed 5");
    assert!(!be.log().contains("cannot watch"), "{}", be.log());
}

#[test]
fn two_frontends_at_once_see_only_their_own_data() {
    let env = Env::new();
    env.guest(1);
    env.guest(2);
    let _be = env.backend();
    let dir = env.dir().to_path_buf();
    let t = std::thread::spawn(move || {
        run_frontend(Path::new(FRONTEND), &dir, 2, 0, &["echo", "--count", "500", "--seed", "2"]).expect("fe2")
    });
    env.assert_frontend_ok(1, &["echo", "--count", "500", "--seed", "1"], "OK echoed 500");
    let (ok, out, err) = t.join().expect("thread");
    assert!(ok && out.contains("OK echoed 500"), "frontend 2: {out} {err}");
}

#[test]
fn restarted_backend_picks_up_a_running_guest() {
    let env = Env::new();
    env.guest(1);
    let mut be = env.backend();
    let dir = env.dir().to_path_buf();
    let t = std::thread::spawn(move || {
        run_frontend(Path::new(FRONTEND), &dir, 1, 0, &["hold", "--seconds", "3"]).expect("fe")
    });
    assert!(env.wait_be_state(1, XenbusState::Connected));
    std::thread::sleep(SEC);
    be.kill();
    let be2 = env.backend();
    let (ok, out, err) = t.join().expect("thread");
    assert!(ok && out.contains("OK held"), "guest kept its TPM across the backend restart: {out} {err}\n{}", be2.log());
    assert!(be2.log().contains("vtpm 1/0: connected"), "{}", be2.log());
}

/// A hostile or broken device next to a good one: the backend logs what went wrong, naming
/// the device, closes it where that is the right answer, and keeps serving the good one.
fn hostile_case(setup: impl FnOnce(&Env, &BackendProcess), expect_log: &str, expect_state: Option<XenbusState>) {
    let env = Env::new();
    env.guest(2);
    toolstack::add_domain(&env.xs, 3, "evil").expect("domain");
    let mut be = env.backend();
    setup(&env, &be);
    assert!(be.wait_log(expect_log, 10 * SEC), "expected log line {expect_log:?}:\n{}", be.log());
    if let Some(s) = expect_state {
        assert!(env.wait_be_state(3, s), "hostile device went to {s:?}, is {:?}", env.be_state(3));
    }
    env.assert_frontend_ok(2, &["echo", "--count", "100"], "OK echoed 100");
    assert!(be.alive(), "backend still running");
    assert!(!be.log().contains("panicked"), "{}", be.log());
}

fn evil_device(env: &Env) {
    toolstack::add_vtpm(&env.xs, 3, 0, 0, &uuid(3)).expect("vtpm");
}

fn evil_frontend(env: &Env) -> RawFrontend {
    RawFrontend::new(&env.host.xen(3), 0, 0).expect("raw frontend")
}

/// The hostile guest's device, connected properly (the misbehaviour comes after).
fn evil_connected(env: &Env) -> RawFrontend {
    evil_device(env);
    let fe = evil_frontend(env);
    fe.publish().expect("publish");
    assert!(fe.wait_backend(XenbusState::Connected, 10 * SEC));
    fe
}

#[test]
fn hostile_length_beyond_the_page() {
    hostile_case(
        |env, _| {
            let fe = evil_connected(env);
            let t = xvtpm_xen::tpmif::Tpmif::new(&fe.page);
            t.write_raw_header(5000, 1, 0, 0).expect("hdr");
            fe.evtchn.notify(fe.port).expect("notify");
            std::mem::forget(fe);
        },
        "vtpm 3/0: bad request in shared page: tpmif: length 5000 exceeds",
        Some(XenbusState::Closing),
    );
}

#[test]
fn hostile_unknown_state_values_are_ignored_and_the_device_still_works() {
    hostile_case(
        |env, be| {
            let fe = evil_connected(env);
            let t = xvtpm_xen::tpmif::Tpmif::new(&fe.page);
            for s in [4u8, 0x7f, 0xff] {
                t.write_raw_header(10, s, 0, 0).expect("hdr");
                fe.evtchn.notify(fe.port).expect("notify");
                assert!(be.wait_log(&format!("invalid shared-page state value {s}"), 5 * SEC), "{}", be.log());
            }
            let rsp = fe.command(b"\x03still here", 5 * SEC).expect("device still serves");
            assert_eq!(rsp, b"\x03still here");
            std::mem::forget(fe);
        },
        "vtpm 3/0",
        Some(XenbusState::Connected),
    );
}

#[test]
fn hostile_missing_protocol_v2() {
    hostile_case(
        |env, _| {
            evil_device(env);
            let fe = evil_frontend(env);
            fe.write("ring-ref", &fe.page.gref().to_string()).expect("w");
            fe.write("event-channel", &fe.port.to_string()).expect("w");
            fe.write("state", "3").expect("w");
            std::mem::forget(fe);
        },
        "vtpm 3/0: frontend does not support vTPM protocol v2",
        Some(XenbusState::Closing),
    );
}

#[test]
fn hostile_missing_uuid() {
    hostile_case(
        |env, _| {
            let be = "/local/domain/0/backend/vtpm/3/0";
            env.xs
                .transaction(|tx| {
                    for (k, v) in [
                        ("frontend", "/local/domain/3/device/vtpm/0"),
                        ("frontend-id", "3"),
                        ("online", "1"),
                        ("state", "1"),
                    ] {
                        env.xs.write(tx, &format!("{be}/{k}"), v.as_bytes())?;
                    }
                    env.xs.write(tx, "/local/domain/3/device/vtpm/0/state", b"1")
                })
                .expect("device without uuid");
        },
        "vtpm 3/0: no uuid in the backend directory",
        Some(XenbusState::Closed),
    );
}

#[test]
fn hostile_malformed_uuid() {
    hostile_case(
        |env, _| {
            toolstack::add_vtpm(&env.xs, 3, 0, 0, "not-a-uuid").expect("vtpm");
        },
        "vtpm 3/0: malformed uuid",
        Some(XenbusState::Closed),
    );
}

#[test]
fn hostile_ring_ref_that_does_not_map() {
    hostile_case(
        |env, _| {
            evil_device(env);
            let fe = evil_frontend(env);
            // The bad ring-ref is in place before Initialised: the backend reads the ring-ref
            // when the state changes (a later change of ring-ref alone fires no watch).
            fe.publish_keys().expect("publish");
            fe.write("ring-ref", "123456").expect("w");
            fe.write("state", "3").expect("w");
            std::mem::forget(fe);
        },
        "vtpm 3/0: cannot map ring-ref 123456",
        Some(XenbusState::Closing),
    );
}

#[test]
fn hostile_invalid_event_channel() {
    hostile_case(
        |env, _| {
            evil_device(env);
            let fe = evil_frontend(env);
            fe.write("ring-ref", &fe.page.gref().to_string()).expect("w");
            fe.write("event-channel", "999").expect("w");
            fe.write("feature-protocol-v2", "1").expect("w");
            fe.write("state", "3").expect("w");
            std::mem::forget(fe);
        },
        "vtpm 3/0: cannot bind event-channel 999",
        Some(XenbusState::Closing),
    );
}

#[test]
fn hostile_state_flapping() {
    hostile_case(
        |env, be| {
            evil_device(env);
            let fe = evil_frontend(env);
            fe.publish_keys().expect("publish");
            for i in 0..300 {
                let s = ["3", "1", "4", "6", "2", "5", "garbage", "3", "0"][i % 9];
                fe.write("state", s).expect("w");
            }
            // It settles: Closed, then Initialised again like a rebooted guest.
            fe.write("state", "6").expect("w");
            assert!(fe.wait_backend(XenbusState::InitWait, 10 * SEC), "backend back in InitWait:\n{}", be.log());
            fe.write("state", "3").expect("w");
            assert!(fe.wait_backend(XenbusState::Connected, 30 * SEC), "backend not Connected:\n{}", be.log());
            assert_eq!(fe.command(b"\x03settled", 5 * SEC).expect("serves"), b"\x03settled");
            std::mem::forget(fe);
        },
        "vtpm 3/0: connected",
        None,
    );
}

/// A frontend that goes Closing on its own and then straight back to Initialised (no Closed in
/// between) is served again: only a protocol error makes the backend insist on a full close.
#[test]
fn frontend_closing_then_initialised_reconnects() {
    hostile_case(
        |env, be| {
            evil_device(env);
            let fe = evil_frontend(env);
            fe.publish().expect("publish");
            assert!(fe.wait_backend(XenbusState::Connected, 30 * SEC), "connects:\n{}", be.log());
            fe.write("state", "5").expect("w");
            assert!(fe.wait_backend(XenbusState::Closing, 10 * SEC), "follows to Closing:\n{}", be.log());
            fe.write("state", "3").expect("w");
            assert!(fe.wait_backend(XenbusState::Connected, 30 * SEC), "connects again:\n{}", be.log());
            assert_eq!(fe.command(b"\x03again", 5 * SEC).expect("serves"), b"\x03again");
            std::mem::forget(fe);
        },
        "vtpm 3/0: connected",
        None,
    );
}

#[test]
fn hostile_notification_storm() {
    hostile_case(
        |env, _| {
            let fe = evil_connected(env);
            let dir = env.dir().to_path_buf();
            // The good guest works during the storm, not only after it.
            let good = std::thread::spawn(move || {
                run_frontend(Path::new(FRONTEND), &dir, 2, 0, &["hold", "--seconds", "1.5"]).expect("fe2")
            });
            let end = std::time::Instant::now() + Duration::from_millis(1500);
            let mut n = 0u64;
            while std::time::Instant::now() < end {
                fe.evtchn.notify(fe.port).expect("notify");
                n += 1;
            }
            let (ok, out, err) = good.join().expect("thread");
            assert!(ok && out.contains("OK held"), "good guest during a storm of {n} notifications: {out} {err}");
            assert_eq!(fe.command(b"\x03after storm", 5 * SEC).expect("serves"), b"\x03after storm");
            std::mem::forget(fe);
        },
        "vtpm 3/0: connected",
        Some(XenbusState::Connected),
    );
}

#[test]
fn frontend_directory_gone_closes_the_device() {
    let env = Env::new();
    env.guest(1);
    let be = env.backend();
    let fe = RawFrontend::new(&env.host.xen(1), 0, 0).expect("frontend");
    fe.publish().expect("publish");
    assert!(fe.wait_backend(XenbusState::Connected, 10 * SEC));
    assert_eq!(fe.command(b"\x01hello", 5 * SEC).expect("works"), b"\x01hello");
    // The guest's domain disappears without the toolstack removing the device first.
    toolstack::remove_domain(&env.xs, 1).expect("rm domain");
    assert!(env.wait_be_state(1, XenbusState::Closed), "backend closed, is {:?}", env.be_state(1));
    assert!(be.wait_log("vtpm 1/0: disconnected", 5 * SEC), "{}", be.log());
    // The toolstack's removal afterwards completes at once.
    assert!(toolstack::remove_vtpm(&env.xs, 1, 0, 0, 10 * SEC).expect("remove"));
    assert!(be.wait_log("vtpm 1/0: device removed", 5 * SEC), "{}", be.log());
}

/// `xl destroy` pauses the guest first, so its frontend is still Connected when libxl writes
/// online=0 and Closing: the backend must reach Closed and stay there.
#[test]
fn toolstack_close_of_a_connected_guest_stays_closed() {
    let env = Env::new();
    env.guest(1);
    let be = env.backend();
    let fe = RawFrontend::new(&env.host.xen(1), 0, 0).expect("frontend");
    fe.publish().expect("publish");
    assert!(fe.wait_backend(XenbusState::Connected, 10 * SEC));
    let bp = "/local/domain/0/backend/vtpm/1/0";
    env.xs.write(TxId::NONE, &format!("{bp}/online"), b"0").expect("online");
    env.xs.write(TxId::NONE, &format!("{bp}/state"), b"5").expect("closing");
    assert!(env.wait_be_state(1, XenbusState::Closed), "{}", be.log());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(env.be_state(1), Some(XenbusState::Closed), "stays closed:\n{}", be.log());
    assert_eq!(be.log().matches("vtpm 1/0: connected").count(), 1, "no reconnect:\n{}", be.log());
}

/// A command that never finishes (an engine stuck, ignoring cancel) must not hold up the
/// removal of its device nor the creation of another guest's.
#[test]
fn stuck_command_blocks_neither_destroy_nor_other_guests() {
    let env = Env::new();
    env.guest(1);
    let be = env.backend();
    let fe = RawFrontend::new(&env.host.xen(1), 0, 0).expect("frontend");
    fe.publish().expect("publish");
    assert!(fe.wait_backend(XenbusState::Connected, 10 * SEC));
    fe.submit(xvtpm_tests::STUCK_MARKER).expect("submit");
    std::thread::sleep(Duration::from_millis(200));
    let t = std::time::Instant::now();
    assert!(toolstack::remove_vtpm(&env.xs, 1, 0, 0, 10 * SEC).expect("remove"), "{}", be.log());
    assert!(t.elapsed() < 2 * SEC, "destroy waited {:?} for a stuck command", t.elapsed());
    env.guest(2);
    assert!(env.wait_be_state(2, XenbusState::InitWait), "new guest's device at InitWait in time");
    env.assert_frontend_ok(2, &["echo", "--count", "20"], "OK echoed 20");
}

/// A backend in a driver domain (a vTPM stub domain): on `xl destroy` of its guest, libxl in
/// dom0 removes the frontend's directory and then waits for the driver domain to remove the
/// backend's, as `xl devd` would. Ours does, so the destroy does not wait out libxl's 10 s.
#[test]
fn driver_domain_backend_removes_its_directory_on_destroy() {
    let env = Env::new();
    toolstack::add_domain(&env.xs, 5, "vtpm-dom").expect("driver domain");
    toolstack::add_domain(&env.xs, 1, "guest1").expect("guest");
    toolstack::add_vtpm(&env.xs, 1, 5, 0, &uuid(1)).expect("vtpm");
    let be = BackendProcess::start(Path::new(BACKEND), env.dir(), 5, &[]).expect("backend");
    let be_path = "/local/domain/5/backend/vtpm/1/0";
    assert!(
        toolstack::wait_for_state(&env.xs, &format!("{be_path}/state"), XenbusState::InitWait, 10 * SEC),
        "{}",
        be.log()
    );
    env.assert_frontend_ok(1, &["echo", "--count", "10"], "OK echoed 10");
    let t = std::time::Instant::now();
    assert!(toolstack::remove_vtpm(&env.xs, 1, 5, 0, 10 * SEC).expect("remove"), "{}", be.log());
    // At once, not after the backend's 1 s grace: the frontend directory's removal was seen
    // (through the backend's one watch on /local/domain, which reports only its top).
    assert!(t.elapsed() < Duration::from_millis(900), "destroy took {:?}", t.elapsed());
    assert_eq!(env.xs.try_read(TxId::NONE, be_path).expect("read"), None);
    // The backend still serves new guests.
    assert!(be.wait_log("vtpm 1/0: device removed", 5 * SEC), "{}", be.log());
    toolstack::add_domain(&env.xs, 2, "guest2").expect("guest");
    toolstack::add_vtpm(&env.xs, 2, 5, 0, &uuid(2)).expect("vtpm");
    env.assert_frontend_ok(2, &["echo", "--count", "10"], "OK echoed 10");
}

/// libxl's removal of a device whose backend is in a driver domain, step by step: with
/// `force` (`xl destroy`) the frontend's directory goes first; without (`xl vtpm-detach`)
/// it stays until the backend's is gone. Then online=0 and Closing, a watch on the state
/// until it reads Closed (a state that vanished before libxl read Closed is its "unable to
/// remove device" error), then a wait for the backend's directory to go. Returns whether the
/// state read Closed and how long the directory took after that.
fn libxl_remove(xs: &Xenstore, fe: u16, be: u16, force: bool) -> (bool, Option<Duration>) {
    let be_path = format!("/local/domain/{be}/backend/vtpm/{fe}/0");
    let fe_path = format!("/local/domain/{fe}/device/vtpm/0");
    xs.transaction(|tx| {
        if force {
            xs.try_rm(tx, &fe_path)?;
        }
        xs.write(tx, &format!("{be_path}/online"), b"0")?;
        xs.write(tx, &format!("{be_path}/state"), b"5")
    })
    .expect("online=0, Closing");
    let state = format!("{be_path}/state");
    let end = std::time::Instant::now() + 10 * SEC;
    let saw_closed = loop {
        match xs.try_read(TxId::NONE, &state).expect("read state") {
            None => break false,
            Some(v) if v == b"6" => break true,
            _ if std::time::Instant::now() > end => break false,
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let t = std::time::Instant::now();
    while xs.try_read(TxId::NONE, &be_path).expect("read").is_some() {
        if t.elapsed() > 10 * SEC {
            return (saw_closed, None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = xs.try_rm(TxId::NONE, &fe_path);
    (saw_closed, Some(t.elapsed()))
}

/// A driver domain's backend answers both of libxl's removals as `xl devd` does: Closed
/// stays readable long enough for libxl's watch, and the directory goes well within libxl's
/// 10 s.
#[test]
fn driver_domain_backend_follows_libxls_destroy_and_detach() {
    let env = Env::new();
    toolstack::add_domain(&env.xs, 5, "vtpm-dom").expect("driver domain");
    let be = BackendProcess::start(Path::new(BACKEND), env.dir(), 5, &[]).expect("backend");
    for (fe, force) in [(1u16, true), (2, false), (3, true)] {
        toolstack::add_domain(&env.xs, fe, &format!("guest{fe}")).expect("guest");
        toolstack::add_vtpm(&env.xs, fe, 5, 0, &uuid(fe)).expect("vtpm");
        let state = format!("/local/domain/5/backend/vtpm/{fe}/0/state");
        assert!(toolstack::wait_for_state(&env.xs, &state, XenbusState::InitWait, 10 * SEC), "{}", be.log());
        if fe == 3 {
            // A guest that never connected (it crashed while booting) is removed the same way.
        } else {
            env.assert_frontend_ok(fe, &["echo", "--count", "5"], "OK echoed 5");
        }
        let (saw_closed, gone) = libxl_remove(&env.xs, fe, 5, force);
        assert!(saw_closed, "guest {fe} (force {force}): the backend's state vanished before it read Closed");
        let gone = gone.unwrap_or_else(|| panic!("guest {fe}: backend directory not removed in 10 s\n{}", be.log()));
        assert!(gone < 3 * SEC, "guest {fe}: removed after {gone:?}");
    }
    assert!(be.wait_log("vtpm 3/0: device removed", 5 * SEC), "{}", be.log());
}

/// The recovery docs/stubdom.md gives when a re-attached device shows Closed: the guest's
/// kernel, still removing the old device, wrote Closed into the new one before the backend
/// (a new vTPM domain) ever connected. `xl vtpm-detach` must then complete, and the next
/// `xl vtpm-attach` of the same device connect.
#[test]
fn device_closed_by_the_guest_before_connecting_detaches_and_attaches_again() {
    let env = Env::new();
    toolstack::add_domain(&env.xs, 5, "vtpm-dom").expect("driver domain");
    toolstack::add_domain(&env.xs, 1, "guest1").expect("guest");
    let be = BackendProcess::start(Path::new(BACKEND), env.dir(), 5, &[]).expect("backend");
    toolstack::add_vtpm(&env.xs, 1, 5, 0, &uuid(1)).expect("vtpm");
    let state = "/local/domain/5/backend/vtpm/1/0/state";
    assert!(toolstack::wait_for_state(&env.xs, state, XenbusState::InitWait, 10 * SEC), "{}", be.log());
    env.xs.write(TxId::NONE, "/local/domain/1/device/vtpm/0/state", b"6").expect("frontend Closed");
    let (saw_closed, gone) = libxl_remove(&env.xs, 1, 5, false);
    assert!(saw_closed, "the backend's state vanished before libxl read Closed\n{}", be.log());
    assert!(gone.is_some_and(|t| t < 3 * SEC), "backend directory not removed in time: {gone:?}\n{}", be.log());
    toolstack::add_vtpm(&env.xs, 1, 5, 0, &uuid(1)).expect("vtpm again");
    env.assert_frontend_ok(1, &["echo", "--count", "5"], "OK echoed 5");
}
