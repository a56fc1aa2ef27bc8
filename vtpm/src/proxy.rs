//! Serving one TPM through the emulator's side of a Linux vTPM proxy device (see
//! [`crate::sys::vtpmx`]): each command read is answered by the engine, except the driver's own
//! locality command, which is answered here.
//!
//! What the proxy forwards besides ordinary commands:
//! - the vendor command SET_LOCALITY (0x20001000, TPM 2.0 and 1.2 alike) with one byte, the
//!   locality the next commands run at. The driver refuses it from user space, so it only comes
//!   from the kernel.
//! - no cancellation: the driver's cancel operation is empty. `vtpm proxy` takes SIGUSR1
//!   instead (see [`crate::sys::signals::cancel_on_sigusr1`]). When the kernel gives up on a
//!   command, the late response is refused (EIO); that is logged and serving goes on.
//! - the device going away: EPIPE on read or write, ending the loop with
//!   [`ProxyEnd::DeviceGone`].

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use xvtpm_xen::wake::WakeFd;

use crate::engine::error_response;
use crate::{Error, Result, TpmEngine, TpmVersion};

/// The ordinal of the driver's locality command, in both TPM versions.
pub const SET_LOCALITY: u32 = 0x2000_1000;
/// The kernel's TPM_BUFSIZE: no command or response through the proxy is larger.
pub const MAX_MESSAGE: usize = 4096;

/// The emulator's side of a proxy device: whole commands in, whole responses out.
pub trait ProxyChannel {
    /// Waits, without a timeout, for one command; `Ok(None)` when `wake` was set (and is now
    /// taken) or a signal interrupted the wait.
    fn recv_command(&mut self, buf: &mut [u8], wake: &WakeFd) -> io::Result<Option<usize>>;
    /// Gives the response to the command last read.
    fn send_response(&mut self, rsp: &[u8]) -> io::Result<()>;
}

/// Why serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyEnd {
    /// The stop flag was set.
    Stopped,
    /// The kernel deleted the device (or never registered it).
    DeviceGone,
}

/// Serves commands from `chan` with `engine` until `stop` is set (whoever sets it sets `wake`
/// too: the wait for a command has no timeout, so an idle vTPM never wakes) or the device goes
/// away. The engine must be powered on (and started, or the kernel starts it while registering).
pub fn serve(
    engine: &mut dyn TpmEngine,
    chan: &mut dyn ProxyChannel,
    stop: &AtomicBool,
    wake: &WakeFd,
) -> Result<ProxyEnd> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut locality = 0u8;
    while !stop.load(Ordering::SeqCst) {
        let n = match chan.recv_command(&mut buf, wake) {
            Ok(None) => continue,
            Ok(Some(n)) => n,
            Err(e) if gone(&e) => return Ok(ProxyEnd::DeviceGone),
            Err(e) => return Err(Error::io("read a command from the proxy device", e)),
        };
        let cmd = &buf[..n];
        let rsp = answer(engine, &mut locality, cmd);
        match chan.send_response(&rsp) {
            Ok(()) => {}
            Err(e) if gone(&e) => return Ok(ProxyEnd::DeviceGone),
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                log::warn!(
                    "the kernel no longer waits for the answer to command {:#x} (it timed out); answer dropped",
                    ordinal(cmd).unwrap_or(0)
                );
            }
            Err(e) => return Err(Error::io("write a response to the proxy device", e)),
        }
    }
    Ok(ProxyEnd::Stopped)
}

fn gone(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EPIPE)
}

fn ordinal(cmd: &[u8]) -> Option<u32> {
    xvtpm_proto::tpm::code(cmd)
}

/// The response to one command: the engine's, or ours for the locality command and for
/// commands whose header is broken.
fn answer(engine: &mut dyn TpmEngine, locality: &mut u8, cmd: &[u8]) -> Vec<u8> {
    let version = engine.version();
    let v2 = version == TpmVersion::V2_0;
    let declared = xvtpm_proto::tpm::be32(cmd, 2).map(|n| n as usize);
    if cmd.len() < 10 || declared != Some(cmd.len()) {
        log::warn!("proxy command of {} bytes with size field {declared:?}: refused", cmd.len());
        // TPM_RC_COMMAND_SIZE / TPM_BAD_PARAM_SIZE
        return error_response(version, if v2 { 0x142 } else { 0x19 });
    }
    if ordinal(cmd) == Some(SET_LOCALITY) {
        return match cmd {
            [_, _, _, _, _, _, _, _, _, _, l] if *l <= 4 => {
                log::debug!("locality {l}");
                *locality = *l;
                error_response(version, 0)
            }
            _ => {
                log::warn!("locality command {cmd:02x?} refused");
                // TPM_RC_LOCALITY / TPM_BAD_LOCALITY
                error_response(version, if v2 { 0x107 } else { 0x3d })
            }
        };
    }
    match engine.process(*locality, cmd) {
        Ok(rsp) => rsp,
        Err(e) => {
            log::error!("command {:#x} failed in the engine: {e}", ordinal(cmd).unwrap_or(0));
            // TPM_RC_FAILURE / TPM_FAIL
            error_response(version, if v2 { 0x101 } else { 0x9 })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::engine::Canceller;
    use crate::StateKind;

    /// Records what it runs and at which locality; answers with a success carrying the
    /// locality.
    struct Fake {
        version: TpmVersion,
        seen: Vec<(u8, Vec<u8>)>,
    }

    impl TpmEngine for Fake {
        fn version(&self) -> TpmVersion {
            self.version
        }
        fn init(&mut self, _: bool) -> Result<()> {
            Ok(())
        }
        fn resume(&mut self, _: &[u8]) -> Result<()> {
            Ok(())
        }
        fn shutdown(&mut self) {}
        fn is_running(&self) -> bool {
            true
        }
        fn process(&mut self, locality: u8, command: &[u8]) -> Result<Vec<u8>> {
            self.seen.push((locality, command.to_vec()));
            if command.get(6..10) == Some(&[0xff; 4]) {
                return Err(Error::PowerState("off"));
            }
            Ok(vec![0x80, 0x01, 0, 0, 0, 11, 0, 0, 0, 0, locality])
        }
        fn canceller(&self) -> Canceller {
            std::sync::Arc::new(|| {})
        }
        fn store_volatile(&mut self) -> Result<()> {
            Ok(())
        }
        fn get_state(&mut self, _: StateKind) -> Result<Vec<u8>> {
            Ok(Vec::new())
        }
        fn set_state(&mut self, _: StateKind, _: &[u8]) -> Result<()> {
            Ok(())
        }
        fn set_buffer_size(&mut self, _: u32) -> Result<(u32, u32, u32)> {
            Ok((4096, 4096, 4096))
        }
        fn established(&mut self) -> Result<bool> {
            Ok(false)
        }
        fn reset_established(&mut self, _: u8) -> Result<()> {
            Ok(())
        }
        fn hash_start(&mut self) -> Result<()> {
            Ok(())
        }
        fn hash_data(&mut self, _: &[u8]) -> Result<()> {
            Ok(())
        }
        fn hash_end(&mut self) -> Result<()> {
            Ok(())
        }
    }

    /// Replays scripted reads; the write results are scripted too (default: accepted).
    struct Script {
        reads: VecDeque<io::Result<Option<Vec<u8>>>>,
        write_errors: VecDeque<Option<i32>>,
        written: Vec<Vec<u8>>,
    }

    impl ProxyChannel for Script {
        fn recv_command(&mut self, buf: &mut [u8], _: &WakeFd) -> io::Result<Option<usize>> {
            match self.reads.pop_front() {
                Some(Ok(Some(c))) => {
                    buf[..c.len()].copy_from_slice(&c);
                    Ok(Some(c.len()))
                }
                Some(Ok(None)) => Ok(None),
                Some(Err(e)) => Err(e),
                None => Err(io::Error::from_raw_os_error(libc::EPIPE)),
            }
        }
        fn send_response(&mut self, rsp: &[u8]) -> io::Result<()> {
            self.written.push(rsp.to_vec());
            match self.write_errors.pop_front().flatten() {
                Some(errno) => Err(io::Error::from_raw_os_error(errno)),
                None => Ok(()),
            }
        }
    }

    fn cmd(tag: u16, ord: u32, body: &[u8]) -> Vec<u8> {
        let mut c = tag.to_be_bytes().to_vec();
        c.extend_from_slice(&((10 + body.len()) as u32).to_be_bytes());
        c.extend_from_slice(&ord.to_be_bytes());
        c.extend_from_slice(body);
        c
    }

    fn rc(rsp: &[u8]) -> u32 {
        u32::from_be_bytes([rsp[6], rsp[7], rsp[8], rsp[9]])
    }

    fn run(
        version: TpmVersion,
        reads: Vec<io::Result<Option<Vec<u8>>>>,
        write_errors: Vec<Option<i32>>,
    ) -> (Fake, Script, Result<ProxyEnd>) {
        let mut engine = Fake { version, seen: Vec::new() };
        let mut chan = Script { reads: reads.into(), write_errors: write_errors.into(), written: Vec::new() };
        let end = serve(&mut engine, &mut chan, &AtomicBool::new(false), &WakeFd::new().expect("eventfd"));
        (engine, chan, end)
    }

    #[test]
    fn the_locality_command_sets_the_locality_of_the_next_commands() {
        let getrandom = cmd(0x8001, 0x17b, &[0, 8]);
        let (engine, chan, end) = run(
            TpmVersion::V2_0,
            vec![
                Ok(Some(getrandom.clone())),
                Ok(Some(cmd(0x8002, SET_LOCALITY, &[3]))),
                Ok(None),
                Ok(Some(getrandom.clone())),
            ],
            vec![],
        );
        assert_eq!(end.expect("served"), ProxyEnd::DeviceGone);
        // The engine never sees the locality command.
        assert_eq!(engine.seen, vec![(0, getrandom.clone()), (3, getrandom)]);
        assert_eq!(chan.written.len(), 3);
        assert_eq!(&chan.written[1][..2], &[0x80, 0x01]);
        assert_eq!(rc(&chan.written[1]), 0);
        assert_eq!(chan.written[2][10], 3);
    }

    #[test]
    fn a_tpm12_locality_command_gets_a_tpm12_answer() {
        let (engine, chan, _) = run(TpmVersion::V1_2, vec![Ok(Some(cmd(0x00c1, SET_LOCALITY, &[2])))], vec![]);
        assert!(engine.seen.is_empty());
        assert_eq!(chan.written, vec![vec![0x00, 0xc4, 0, 0, 0, 10, 0, 0, 0, 0]]);
    }

    #[test]
    fn bad_locality_commands_and_broken_headers_get_error_responses() {
        let (engine, chan, end) = run(
            TpmVersion::V2_0,
            vec![
                Ok(Some(cmd(0x8002, SET_LOCALITY, &[5]))),
                Ok(Some(cmd(0x8002, SET_LOCALITY, &[1, 2]))),
                Ok(Some(vec![0x80, 0x01, 0, 0, 0, 99, 0, 0, 1, 0x7b, 0, 8])),
                Ok(Some(vec![0x80, 0x01, 0])),
            ],
            vec![],
        );
        assert_eq!(end.expect("served"), ProxyEnd::DeviceGone);
        assert!(engine.seen.is_empty(), "{:?}", engine.seen);
        let codes: Vec<u32> = chan.written.iter().map(|r| rc(r)).collect();
        assert_eq!(codes, vec![0x107, 0x107, 0x142, 0x142]);
    }

    #[test]
    fn an_engine_failure_is_a_tpm_failure_response_and_serving_goes_on() {
        let (engine, chan, _) = run(
            TpmVersion::V2_0,
            vec![Ok(Some(cmd(0x8001, 0xffff_ffff, &[]))), Ok(Some(cmd(0x8001, 0x17b, &[0, 8])))],
            vec![],
        );
        assert_eq!(engine.seen.len(), 2);
        assert_eq!(rc(&chan.written[0]), 0x101);
        assert_eq!(rc(&chan.written[1]), 0);
    }

    #[test]
    fn a_response_the_kernel_no_longer_waits_for_is_dropped() {
        let c = cmd(0x8001, 0x17b, &[0, 8]);
        let (engine, chan, end) =
            run(TpmVersion::V2_0, vec![Ok(Some(c.clone())), Ok(Some(c))], vec![Some(libc::EIO), None]);
        assert_eq!(end.expect("served"), ProxyEnd::DeviceGone);
        assert_eq!(engine.seen.len(), 2);
        assert_eq!(chan.written.len(), 2);
    }

    #[test]
    fn the_device_going_away_on_write_ends_serving() {
        let c = cmd(0x8001, 0x17b, &[0, 8]);
        let (engine, _, end) = run(TpmVersion::V2_0, vec![Ok(Some(c.clone())), Ok(Some(c))], vec![Some(libc::EPIPE)]);
        assert_eq!(end.expect("ends"), ProxyEnd::DeviceGone);
        assert_eq!(engine.seen.len(), 1);
    }

    #[test]
    fn other_read_errors_are_errors() {
        let (_, _, end) = run(TpmVersion::V2_0, vec![Err(io::Error::from_raw_os_error(libc::EIO))], vec![]);
        assert!(end.expect_err("EIO").to_string().contains("read a command"));
    }

    #[test]
    fn the_stop_flag_ends_serving() {
        let mut engine = Fake { version: TpmVersion::V2_0, seen: Vec::new() };
        let mut chan = Script { reads: VecDeque::new(), write_errors: VecDeque::new(), written: Vec::new() };
        let wake = WakeFd::new().expect("eventfd");
        assert_eq!(serve(&mut engine, &mut chan, &AtomicBool::new(true), &wake).expect("stops"), ProxyEnd::Stopped);
    }
}
