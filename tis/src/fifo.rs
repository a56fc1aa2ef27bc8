//! The FIFO interface: TIS 1.2/1.3 and the PTP FIFO of TPM 2.0. One command at a time: take
//! the locality, commandReady, write the command in burstCount-sized pieces checking Expect,
//! tpmGo, wait for dataAvail within the command's duration, read the response checking its
//! length, commandReady, give the locality back.

use std::time::Duration;

use crate::clock::Clock;
use crate::command::{self, HEADER_SIZE};
use crate::mmio::{loc_reg, Mmio, LOCALITIES};
use crate::regs::fifo::*;
use crate::timeouts::{Durations, Timeouts};
use crate::{Error, Family, Result};

/// The largest buffer a TPM may claim: TPMs have 1-4 KiB; more is a broken or hostile TPM
/// trying to make us allocate.
pub const MAX_BUFFER: usize = 64 << 10;

/// How often status registers are polled.
const POLL: Duration = Duration::from_micros(50);

/// A FIFO-interface TPM.
#[derive(Debug)]
pub struct Fifo<M, C> {
    mmio: M,
    clock: C,
    family: Family,
    ptp: bool,
    timeouts: Timeouts,
    durations: Durations,
    max_buffer: usize,
}

impl<M: Mmio, C: Clock> Fifo<M, C> {
    /// A driver for a FIFO TPM of `family`; `ptp` when the interface is the PTP FIFO (it has
    /// commandCancel). Timeouts start at the family's defaults.
    pub fn new(mmio: M, clock: C, family: Family, ptp: bool) -> Self {
        Self {
            mmio,
            clock,
            family,
            ptp,
            timeouts: Timeouts::default_for(family),
            durations: Durations::default_for(family),
            max_buffer: 4096,
        }
    }

    /// The TPM family.
    pub fn family(&self) -> Family {
        self.family
    }

    /// Timeouts in force.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Durations in force.
    pub fn durations(&self) -> Durations {
        self.durations
    }

    /// Replaces the timeouts and durations (TPM 1.2 reports its own).
    pub fn set_timing(&mut self, timeouts: Timeouts, durations: Durations) {
        self.timeouts = timeouts;
        self.durations = durations;
    }

    /// The largest command and response exchanged (the TPM's buffer size).
    pub fn max_buffer(&self) -> usize {
        self.max_buffer
    }

    /// Sets the largest command and response (from the TPM's reported buffer size), within
    /// [`MAX_BUFFER`].
    pub fn set_max_buffer(&mut self, n: usize) {
        self.max_buffer = n.clamp(HEADER_SIZE, MAX_BUFFER);
    }

    /// The register window and the clock back.
    pub fn into_parts(self) -> (M, C) {
        (self.mmio, self.clock)
    }

    /// The register window (for callers that read identification registers).
    pub fn mmio(&mut self) -> &mut M {
        &mut self.mmio
    }

    /// Polls `cond` until it holds or `timeout` passes; the last value read either way.
    fn poll<T>(
        &mut self,
        timeout: Duration,
        mut read: impl FnMut(&mut M) -> T,
        cond: impl Fn(&T) -> bool,
    ) -> (bool, T) {
        let deadline = self.clock.now().saturating_add(timeout);
        loop {
            let v = read(&mut self.mmio);
            if cond(&v) {
                return (true, v);
            }
            if self.clock.now() >= deadline {
                return (false, v);
            }
            self.clock.sleep(POLL);
        }
    }

    fn access(m: &mut M, loc: u8) -> u8 {
        m.read8(loc_reg(loc, ACCESS))
    }

    fn sts(m: &mut M, loc: u8) -> u32 {
        m.read32(loc_reg(loc, STS))
    }

    fn is_active(access: u8) -> bool {
        access & (ACCESS_VALID | ACCESS_ACTIVE_LOCALITY) == ACCESS_VALID | ACCESS_ACTIVE_LOCALITY
    }

    /// Makes `loc` the active locality. Another locality left active (by firmware, or by us
    /// before a crash) is relinquished first: this driver is the TPM's only user.
    pub fn request_locality(&mut self, loc: u8) -> Result<()> {
        if loc >= LOCALITIES {
            return Err(Error::Locality { locality: loc, why: "localities are 0 to 4" });
        }
        if Self::is_active(Self::access(&mut self.mmio, loc)) {
            return Ok(());
        }
        for other in (0..LOCALITIES).filter(|&l| l != loc) {
            if Self::is_active(Self::access(&mut self.mmio, other)) {
                log::debug!("relinquishing locality {other}, left active, before using {loc}");
                self.mmio.write8(loc_reg(other, ACCESS), ACCESS_ACTIVE_LOCALITY);
            }
        }
        self.mmio.write8(loc_reg(loc, ACCESS), ACCESS_REQUEST_USE);
        let a = self.timeouts.a;
        let (granted, _) = self.poll(a, |m| Self::access(m, loc), |&v| Self::is_active(v));
        if granted {
            Ok(())
        } else {
            Err(Error::LocalityNotGranted { locality: loc, waited: a })
        }
    }

    /// Gives `loc` up.
    pub fn relinquish(&mut self, loc: u8) {
        if loc < LOCALITIES && Self::is_active(Self::access(&mut self.mmio, loc)) {
            self.mmio.write8(loc_reg(loc, ACCESS), ACCESS_ACTIVE_LOCALITY);
        }
    }

    /// Waits for stsValid (timeout C) and returns STS.
    fn valid_sts(&mut self, loc: u8) -> Result<u32> {
        let c = self.timeouts.c;
        match self.poll(c, |m| Self::sts(m, loc), |&s| s & STS_VALID != 0) {
            (true, s) => Ok(s),
            (false, _) => Err(Error::StatusNotValid(c)),
        }
    }

    /// Puts the TPM in the ready state (timeout B).
    fn ready(&mut self, loc: u8) -> Result<()> {
        if Self::sts(&mut self.mmio, loc) & STS_COMMAND_READY != 0 {
            return Ok(());
        }
        self.mmio.write8(loc_reg(loc, STS), STS_COMMAND_READY as u8);
        let b = self.timeouts.b;
        match self.poll(b, |m| Self::sts(m, loc), |&s| s & STS_COMMAND_READY != 0) {
            (true, _) => Ok(()),
            (false, _) => Err(Error::NotReady(b)),
        }
    }

    /// The burst count, waiting up to timeout D for it to be non-zero.
    fn burst(&mut self, loc: u8) -> Result<usize> {
        let d = self.timeouts.d;
        match self.poll(d, |m| (Self::sts(m, loc) >> STS_BURST_SHIFT) & STS_BURST_MASK, |&b| b != 0) {
            (true, b) => Ok(b as usize),
            (false, _) => Err(Error::BurstCountZero(d)),
        }
    }

    fn send(&mut self, loc: u8, cmd: &[u8]) -> Result<()> {
        let total = cmd.len();
        let fifo = loc_reg(loc, DATA_FIFO);
        let mut sent = 0;
        // All but the last byte in bursts; the TPM must keep expecting throughout.
        while sent < total - 1 {
            let n = self.burst(loc)?.min(total - 1 - sent);
            for &b in &cmd[sent..sent + n] {
                self.mmio.write8(fifo, b);
            }
            sent += n;
            if self.valid_sts(loc)? & STS_EXPECT == 0 {
                return Err(Error::ExpectMismatch { what: "stopped expecting data", sent, total });
            }
        }
        self.burst(loc)?;
        self.mmio.write8(fifo, cmd[total - 1]);
        if self.valid_sts(loc)? & STS_EXPECT != 0 {
            return Err(Error::ExpectMismatch { what: "still expects data", sent: total, total });
        }
        Ok(())
    }

    /// Reads into `buf[got..to]` while the TPM has data.
    fn recv_into(&mut self, loc: u8, buf: &mut [u8], got: &mut usize, to: usize, claimed: usize) -> Result<()> {
        let fifo = loc_reg(loc, DATA_FIFO);
        while *got < to {
            let c = self.timeouts.c;
            let want = STS_VALID | STS_DATA_AVAIL;
            let (avail, _) = self.poll(c, |m| Self::sts(m, loc), |&s| s & want == want);
            if !avail {
                return Err(Error::ResponseShort { got: *got, claimed });
            }
            let n = self.burst(loc)?.min(to - *got);
            for b in &mut buf[*got..*got + n] {
                *b = self.mmio.read8(fifo);
            }
            *got += n;
        }
        Ok(())
    }

    fn receive(&mut self, loc: u8) -> Result<Vec<u8>> {
        let mut header = [0u8; HEADER_SIZE];
        let mut got = 0;
        self.recv_into(loc, &mut header, &mut got, HEADER_SIZE, HEADER_SIZE)?;
        let size = command::response_size(&header, self.max_buffer)?;
        let mut rsp = vec![0u8; size];
        rsp[..HEADER_SIZE].copy_from_slice(&header);
        self.recv_into(loc, &mut rsp, &mut got, size, size)?;
        if self.valid_sts(loc)? & STS_DATA_AVAIL != 0 {
            return Err(Error::ResponseLong { claimed: size });
        }
        Ok(rsp)
    }

    /// Stops a command that overran its duration.
    fn cancel(&mut self, loc: u8) {
        if self.ptp {
            self.mmio.write32(loc_reg(loc, STS), STS_COMMAND_CANCEL);
        }
        // TPM 1.2 (and after a PTP cancel): commandReady aborts the command.
        self.mmio.write8(loc_reg(loc, STS), STS_COMMAND_READY as u8);
    }

    fn exchange(&mut self, loc: u8, cmd: &[u8], ordinal: u32) -> Result<Vec<u8>> {
        self.ready(loc)?;
        self.send(loc, cmd)?;
        self.mmio.write8(loc_reg(loc, STS), STS_GO as u8);
        let limit = self.durations.for_ordinal(self.family, ordinal);
        let want = STS_VALID | STS_DATA_AVAIL;
        let (done, _) = self.poll(limit, |m| Self::sts(m, loc), |&s| s & want == want);
        if !done {
            self.cancel(loc);
            return Err(Error::CommandTimeout { ordinal, waited: limit });
        }
        self.receive(loc)
    }

    /// Sends `cmd` at `loc` and returns the response.
    pub fn transmit(&mut self, loc: u8, cmd: &[u8]) -> Result<Vec<u8>> {
        let ordinal = command::check_command(cmd, self.max_buffer)?;
        self.request_locality(loc)?;
        let r = self.exchange(loc, cmd, ordinal);
        if let Err(e) = &r {
            log::warn!("TPM command {ordinal:#x} at locality {loc}: {e}");
        }
        // Back to ready/idle whatever happened: this also drops an unread or overlong response.
        self.mmio.write8(loc_reg(loc, STS), STS_COMMAND_READY as u8);
        self.relinquish(loc);
        r
    }
}
