//! The frontend against our backend on the simulated Xen, in this process: the handshake,
//! commands, locality, the size limit, a command that times out and is cancelled, closing and
//! reconnecting, and backends that never connect or refuse.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use xvtpm_backend::{Backend, BackendConfig, BackendHandle, CommandHandler, Request};
use xvtpm_xen::sim::SimHost;
use xvtpm_xen::toolstack;

use super::*;

const GUEST: DomId = 4;
const UUID: &str = "00000000-0000-4000-8000-0000000000aa";

/// Answers `[locality, command...]`; a command starting with 0xEE gets its length (u32), one
/// starting with 0xFF runs until cancelled.
#[derive(Debug, Default)]
struct Handler {
    cancelled: AtomicUsize,
}

impl CommandHandler for Handler {
    fn handle(&self, req: &Request<'_>) -> Vec<u8> {
        if req.command.first() == Some(&0xFF) {
            while !req.is_cancelled() {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.cancelled.fetch_add(1, Ordering::SeqCst);
            return vec![0xFF];
        }
        if req.command.first() == Some(&0xEE) {
            return (req.command.len() as u32).to_be_bytes().to_vec();
        }
        [&[req.locality][..], req.command].concat()
    }
}

struct Setup {
    host: SimHost,
    handler: Arc<Handler>,
    _backend: Option<BackendHandle>,
}

fn setup(with_backend: bool) -> Setup {
    let host = SimHost::temp().expect("sim");
    let xs = host.xen(0).xenstore().expect("xenstore");
    toolstack::add_domain(&xs, GUEST, "guest").expect("domain");
    let handler = Arc::new(Handler::default());
    let backend = with_backend.then(|| {
        Backend::new(Arc::new(host.xen(0)), handler.clone(), BackendConfig::default()).spawn().expect("backend")
    });
    toolstack::add_vtpm(&xs, GUEST, 0, 0, UUID).expect("device");
    Setup { host, handler, _backend: backend }
}

fn config() -> FrontendConfig {
    FrontendConfig {
        connect_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

#[test]
fn commands_round_trip_with_their_locality() {
    let s = setup(true);
    let mut fe = Frontend::connect(&s.host.xen(GUEST), config()).expect("connect");
    assert_eq!(fe.transmit(&[1, 2, 3]).expect("cmd"), [0, 1, 2, 3]);
    fe.set_locality(2);
    assert_eq!(fe.transmit(&[4]).expect("cmd"), [2, 4]);
    let mut biggest = vec![0xEE; fe.max_command()];
    assert_eq!(fe.transmit(&biggest).expect("largest command"), (MAX_PACKET as u32).to_be_bytes());
    // A response that does not fit the page is not delivered: the command reads as cancelled.
    biggest[0] = 7;
    assert!(matches!(fe.transmit(&biggest), Err(Error::Cancelled)));
    assert_eq!(fe.transmit(&[8]).expect("cmd"), [2, 8]);
}

#[test]
fn an_oversized_command_is_refused_here() {
    let s = setup(true);
    let mut fe = Frontend::connect(&s.host.xen(GUEST), config()).expect("connect");
    let e = fe.transmit(&vec![0u8; MAX_PACKET + 1]).expect_err("too large");
    assert!(matches!(e, Error::CommandTooLarge { len, max } if len == MAX_PACKET + 1 && max == MAX_PACKET), "{e}");
    // Nothing went to the backend: the device still serves.
    assert_eq!(fe.transmit(&[9]).expect("cmd"), [0, 9]);
}

#[test]
fn a_command_that_takes_too_long_is_cancelled_and_the_device_stays_usable() {
    let s = setup(true);
    let cfg = FrontendConfig { command_timeout: Duration::from_millis(300), ..config() };
    let mut fe = Frontend::connect(&s.host.xen(GUEST), cfg).expect("connect");
    let e = fe.transmit(&[0xFF]).expect_err("times out");
    assert!(matches!(e, Error::Timeout(_)), "{e}");
    assert_eq!(s.handler.cancelled.load(Ordering::SeqCst), 1, "the backend saw the cancel");
    assert_eq!(fe.transmit(&[5]).expect("cmd after a cancel"), [0, 5]);
}

#[test]
fn close_then_connect_again_as_a_rebooting_guest_does() {
    let s = setup(true);
    let xs = s.host.xen(0).xenstore().expect("xenstore");
    let fe_dir = vtpm_frontend_path(GUEST, 0);
    let mut fe = Frontend::connect(&s.host.xen(GUEST), config()).expect("connect");
    assert_eq!(fe.transmit(&[1]).expect("cmd"), [0, 1]);
    fe.close().expect("close");
    assert_eq!(xs.try_read(TxId::NONE, &format!("{fe_dir}/ring-ref")).expect("read"), None, "keys removed");
    assert_eq!(xs.read(TxId::NONE, &format!("{fe_dir}/state")).expect("state"), b"6");
    let mut fe = Frontend::connect(&s.host.xen(GUEST), config()).expect("reconnect");
    assert_eq!(fe.transmit(&[2]).expect("cmd"), [0, 2]);
}

#[test]
fn no_backend_is_a_clear_error() {
    let s = setup(false);
    let cfg = FrontendConfig { connect_timeout: Duration::from_millis(300), ..config() };
    let e = Frontend::connect(&s.host.xen(GUEST), cfg).expect_err("nobody serves");
    assert!(matches!(&e, Error::NotConnected { reason, .. } if reason.contains("after")), "{e}");
}

#[test]
fn a_backend_that_closes_says_why() {
    let s = setup(false);
    let xs = s.host.xen(0).xenstore().expect("xenstore");
    let be = xvtpm_xen::xenbus::vtpm_backend_path(0, GUEST, 0);
    xs.write(TxId::NONE, &format!("{be}/error"), b"no such vTPM").expect("error");
    xs.write(TxId::NONE, &format!("{be}/state"), b"6").expect("closed");
    let e = Frontend::connect(&s.host.xen(GUEST), config()).expect_err("refused");
    assert!(e.to_string().contains("no such vTPM"), "{e}");
}
