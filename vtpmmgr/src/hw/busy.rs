//! A hardware TPM that answers "not now" has not run the command: TPM 2.0's TPM_RC_RETRY,
//! TPM_RC_YIELDED, TPM_RC_TESTING, TPM_RC_NV_RATE (it throttles NV writes to protect its
//! flash) and TPM_RC_NV_UNAVAILABLE; TPM 1.2's TPM_RETRY and TPM_DOING_SELFTEST. The command is
//! sent again, unchanged, after a pause that doubles up to a bound, for a bounded time; after
//! that its code reaches the caller as any other error. TPM 2.0 sessions survive a failed
//! command (nonceTPM changes only on success), so an authorized command may be resent as it
//! is; a TPM 1.2 error ends the command's OIAP/OSAP session, so there only unauthorized
//! commands are retried (the caller passes no codes for the others).

use std::time::{Duration, Instant};

use xvtpm_tis::HwTpm;

use crate::Result;

/// TPM 2.0's "try again" codes.
pub(crate) const TPM2: [u32; 5] = [0x922, 0x908, 0x90A, 0x920, 0x923];
/// TPM 1.2's.
pub(crate) const TPM12: [u32; 2] = [0x800, 0x802];

/// How long one command is retried, and its first and longest pause.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    pub budget: Duration,
    pub first: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        // NV rate limiting on chips lasts from milliseconds to seconds per write.
        Backoff { budget: Duration::from_secs(30), first: Duration::from_millis(10), max: Duration::from_secs(2) }
    }
}

/// Sends `cmd` until the TPM answers with something other than one of `busy`, or `backoff`'s
/// budget is spent (then its last answer); counts each command sent in `commands`.
pub(crate) fn transmit(
    tpm: &mut dyn HwTpm,
    locality: u8,
    cmd: &[u8],
    busy: &[u32],
    backoff: Backoff,
    commands: &mut u64,
) -> Result<Vec<u8>> {
    let start = Instant::now();
    let mut pause = backoff.first;
    let mut retries = 0u32;
    loop {
        *commands += 1;
        let r = tpm.transmit(locality, cmd)?;
        let rc = r.get(6..10).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(0);
        if !busy.contains(&rc) {
            if retries > 0 {
                log::info!("the hardware TPM took the command after {retries} retries in {:?}", start.elapsed());
            }
            return Ok(r);
        }
        if start.elapsed() + pause > backoff.budget {
            log::error!(
                "the hardware TPM still answers {rc:#x} (busy or rate-limited) after {retries} retries in {:?}; giving up",
                start.elapsed()
            );
            return Ok(r);
        }
        if retries == 0 {
            log::warn!("the hardware TPM answered {rc:#x} (busy or rate-limited); sending the command again");
        }
        retries += 1;
        std::thread::sleep(pause);
        pause = (pause * 2).min(backoff.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xvtpm_tis::Family;

    /// Answers `busy_rc` `n` times, then success; records what it was sent.
    struct Busy {
        n: usize,
        busy_rc: u32,
        sent: Vec<Vec<u8>>,
    }

    impl HwTpm for Busy {
        fn transmit(&mut self, _: u8, command: &[u8]) -> xvtpm_tis::Result<Vec<u8>> {
            self.sent.push(command.to_vec());
            let rc = if self.n > 0 {
                self.n -= 1;
                self.busy_rc
            } else {
                0
            };
            let mut r = vec![0x80, 0x01, 0, 0, 0, 10];
            r.extend_from_slice(&rc.to_be_bytes());
            Ok(r)
        }
        fn family(&self) -> Family {
            Family::Tpm20
        }
        fn describe(&self) -> String {
            "busy".into()
        }
    }

    const QUICK: Backoff =
        Backoff { budget: Duration::from_millis(200), first: Duration::from_millis(1), max: Duration::from_millis(8) };

    #[test]
    fn a_busy_tpm_gets_the_same_command_again_until_it_takes_it() {
        let mut t = Busy { n: 3, busy_rc: 0x920, sent: Vec::new() };
        let mut commands = 0;
        let r = transmit(&mut t, 0, b"cmd", &TPM2, QUICK, &mut commands).expect("answer");
        assert_eq!(&r[6..10], &[0, 0, 0, 0]);
        assert_eq!((commands, t.sent.len()), (4, 4));
        assert!(t.sent.iter().all(|c| c == b"cmd"), "sent unchanged");
    }

    #[test]
    fn a_tpm_busy_for_longer_than_the_budget_gets_its_code_back() {
        let mut t = Busy { n: usize::MAX, busy_rc: 0x922, sent: Vec::new() };
        let mut commands = 0;
        let start = Instant::now();
        let r = transmit(&mut t, 0, b"cmd", &TPM2, QUICK, &mut commands).expect("answer");
        assert_eq!(&r[6..10], &0x922u32.to_be_bytes());
        assert!(start.elapsed() <= Duration::from_millis(400), "{:?}", start.elapsed());
        assert!(commands > 3, "{commands}");
    }

    #[test]
    fn other_errors_are_not_retried() {
        let mut t = Busy { n: 5, busy_rc: 0x101, sent: Vec::new() };
        let mut commands = 0;
        let r = transmit(&mut t, 0, b"cmd", &TPM2, QUICK, &mut commands).expect("answer");
        assert_eq!(&r[6..10], &0x101u32.to_be_bytes());
        assert_eq!(commands, 1);
    }
}
