//! The Command Response Buffer interface (TPM 2.0 only): take the locality, cmdReady, copy the
//! command into the command buffer, CTRL_START, wait for the TPM to clear it, copy the
//! response out, goIdle, give the locality back.

use std::time::Duration;

use crate::clock::Clock;
use crate::command::{self, HEADER_SIZE};
use crate::mmio::{loc_reg, Mmio, LOCALITIES};
use crate::regs::crb::*;
use crate::timeouts::{Durations, Timeouts};
use crate::{Error, Family, Result};

const POLL: Duration = Duration::from_micros(50);

/// Where the command and response buffers sit in the mapped window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrbBuffers {
    /// Offset of the command buffer in the window.
    pub cmd_offset: u32,
    /// Its size.
    pub cmd_size: u32,
    /// Offset of the response buffer in the window.
    pub rsp_offset: u32,
    /// Its size.
    pub rsp_size: u32,
}

/// A CRB TPM.
#[derive(Debug)]
pub struct Crb<M, C> {
    mmio: M,
    /// INTF_ID.CapLocality: localities other than 0 exist.
    localities: bool,
    clock: C,
    timeouts: Timeouts,
    durations: Durations,
}

impl<M: Mmio, C: Clock> Crb<M, C> {
    /// A driver with the PTP's default timeouts.
    pub fn new(mut mmio: M, clock: C) -> Self {
        let localities = mmio.read32(loc_reg(0, INTF_ID_LO)) & INTF_CAP_LOCALITY != 0;
        Self {
            mmio,
            localities,
            clock,
            timeouts: Timeouts::default_for(Family::Tpm20),
            durations: Durations::default_for(Family::Tpm20),
        }
    }

    /// Timeouts in force.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Durations in force.
    pub fn durations(&self) -> Durations {
        self.durations
    }

    /// The register window.
    pub fn mmio(&mut self) -> &mut M {
        &mut self.mmio
    }

    fn poll(&mut self, timeout: Duration, mut cond: impl FnMut(&mut M) -> bool) -> bool {
        let deadline = self.clock.now().saturating_add(timeout);
        loop {
            if cond(&mut self.mmio) {
                return true;
            }
            if self.clock.now() >= deadline {
                return false;
            }
            self.clock.sleep(POLL);
        }
    }

    fn active_is(state: u32, loc: u8) -> bool {
        let want = LOC_STATE_VALID | LOC_STATE_ASSIGNED;
        state & want == want && (state >> LOC_STATE_ACTIVE_SHIFT) & 7 == u32::from(loc)
    }

    /// Makes `loc` the active locality, relinquishing one left active.
    pub fn request_locality(&mut self, loc: u8) -> Result<()> {
        if loc >= LOCALITIES {
            return Err(Error::Locality { locality: loc, why: "localities are 0 to 4" });
        }
        if loc != 0 && !self.localities {
            return Err(Error::Locality {
                locality: loc,
                why: "this CRB implements locality 0 only (INTF_ID.CapLocality is 0)",
            });
        }
        // LOC_STATE reads the same from every locality page.
        let state = self.mmio.read32(loc_reg(0, LOC_STATE));
        if Self::active_is(state, loc) && self.mmio.read32(loc_reg(loc, LOC_STS)) & LOC_STS_GRANTED != 0 {
            return Ok(());
        }
        let want = LOC_STATE_VALID | LOC_STATE_ASSIGNED;
        if state & want == want {
            let other = ((state >> LOC_STATE_ACTIVE_SHIFT) & 7) as u8;
            if other != loc && other < LOCALITIES {
                log::debug!("relinquishing locality {other}, left active, before using {loc}");
                self.mmio.write32(loc_reg(other, LOC_CTRL), LOC_CTRL_RELINQUISH);
            }
        }
        self.mmio.write32(loc_reg(loc, LOC_CTRL), LOC_CTRL_REQUEST);
        let a = self.timeouts.a;
        let granted = self.poll(a, |m| {
            Self::active_is(m.read32(loc_reg(loc, LOC_STATE)), loc)
                && m.read32(loc_reg(loc, LOC_STS)) & LOC_STS_GRANTED != 0
        });
        if granted {
            Ok(())
        } else {
            Err(Error::LocalityNotGranted { locality: loc, waited: a })
        }
    }

    /// Gives `loc` up.
    pub fn relinquish(&mut self, loc: u8) {
        if loc < LOCALITIES {
            self.mmio.write32(loc_reg(loc, LOC_CTRL), LOC_CTRL_RELINQUISH);
        }
    }

    /// The command and response buffers of `loc`, checked to lie inside the mapped window.
    pub fn buffers(&mut self, loc: u8) -> Result<CrbBuffers> {
        let m = &mut self.mmio;
        let cmd_addr =
            u64::from(m.read32(loc_reg(loc, CMD_HADDR))) << 32 | u64::from(m.read32(loc_reg(loc, CMD_LADDR)));
        let cmd_size = m.read32(loc_reg(loc, CMD_SIZE));
        let rsp_addr =
            u64::from(m.read32(loc_reg(loc, RSP_ADDR_HI))) << 32 | u64::from(m.read32(loc_reg(loc, RSP_ADDR_LO)));
        let rsp_size = m.read32(loc_reg(loc, RSP_SIZE));
        let (base, len) = (m.base(), u64::from(m.len()));
        let place = |what: &str, addr: u64, size: u32| -> Result<u32> {
            let off = addr.checked_sub(base).filter(|off| off.saturating_add(u64::from(size)) <= len);
            match off {
                Some(off) if (size as usize) >= HEADER_SIZE => Ok(off as u32),
                Some(_) => Err(Error::CrbBuffer(format!("{what} buffer of {size} bytes is smaller than a TPM header"))),
                None => Err(Error::CrbBuffer(format!(
                    "{what} buffer at {addr:#x} ({size} bytes) lies outside the mapped window {base:#x}+{len:#x}"
                ))),
            }
        };
        Ok(CrbBuffers {
            cmd_offset: place("command", cmd_addr, cmd_size)?,
            cmd_size,
            rsp_offset: place("response", rsp_addr, rsp_size)?,
            rsp_size,
        })
    }

    fn check_fatal(&mut self, loc: u8) -> Result<()> {
        let sts = self.mmio.read32(loc_reg(loc, CTRL_STS));
        if sts & CTRL_STS_FATAL != 0 {
            return Err(Error::CrbFatal(sts));
        }
        Ok(())
    }

    fn ready(&mut self, loc: u8) -> Result<()> {
        self.mmio.write32(loc_reg(loc, CTRL_REQ), CTRL_REQ_CMD_READY);
        let b = self.timeouts.b;
        let ok = self.poll(b, |m| {
            m.read32(loc_reg(loc, CTRL_REQ)) & CTRL_REQ_CMD_READY == 0
                && m.read32(loc_reg(loc, CTRL_STS)) & CTRL_STS_IDLE == 0
        });
        if !ok {
            self.check_fatal(loc)?;
            return Err(Error::NotReady(b));
        }
        Ok(())
    }

    /// Copies into the buffer: bytes up to a 4-byte boundary, then 32-bit words, then bytes
    /// (32-bit accesses must be aligned).
    fn write_buf(&mut self, at: u32, data: &[u8]) {
        let head = ((4 - at % 4) % 4) as usize;
        let (head, rest) = data.split_at(head.min(data.len()));
        let mut off = at;
        for &b in head {
            self.mmio.write8(off, b);
            off += 1;
        }
        let mut words = rest.chunks_exact(4);
        for c in &mut words {
            self.mmio.write32(off, u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            off += 4;
        }
        for &b in words.remainder() {
            self.mmio.write8(off, b);
            off += 1;
        }
    }

    /// Copies out of the buffer, with the same alignment rule as [`Self::write_buf`].
    fn read_buf(&mut self, at: u32, out: &mut [u8]) {
        let head = ((4 - at % 4) % 4) as usize;
        let split = head.min(out.len());
        let (head, rest) = out.split_at_mut(split);
        let mut off = at;
        for b in head {
            *b = self.mmio.read8(off);
            off += 1;
        }
        let mut words = rest.chunks_exact_mut(4);
        for c in &mut words {
            c.copy_from_slice(&self.mmio.read32(off).to_le_bytes());
            off += 4;
        }
        for b in words.into_remainder() {
            *b = self.mmio.read8(off);
            off += 1;
        }
    }

    fn exchange(&mut self, loc: u8, cmd: &[u8], ordinal: u32) -> Result<Vec<u8>> {
        self.ready(loc)?;
        let bufs = self.buffers(loc)?;
        if cmd.len() > bufs.cmd_size as usize {
            return Err(Error::BadCommand { size: cmd.len(), why: "larger than the CRB command buffer" });
        }
        self.write_buf(bufs.cmd_offset, cmd);
        self.mmio.write32(loc_reg(loc, CTRL_START), START);
        let limit = self.durations.for_ordinal(Family::Tpm20, ordinal);
        if !self.poll(limit, |m| m.read32(loc_reg(loc, CTRL_START)) & START == 0) {
            self.mmio.write32(loc_reg(loc, CTRL_CANCEL), START);
            let b = self.timeouts.b;
            self.poll(b, |m| m.read32(loc_reg(loc, CTRL_START)) & START == 0);
            self.mmio.write32(loc_reg(loc, CTRL_CANCEL), 0);
            return Err(Error::CommandTimeout { ordinal, waited: limit });
        }
        self.check_fatal(loc)?;
        let mut header = [0u8; HEADER_SIZE];
        self.read_buf(bufs.rsp_offset, &mut header);
        let size = command::response_size(&header, bufs.rsp_size as usize)?;
        let mut rsp = vec![0u8; size];
        rsp[..HEADER_SIZE].copy_from_slice(&header);
        self.read_buf(bufs.rsp_offset + HEADER_SIZE as u32, &mut rsp[HEADER_SIZE..]);
        Ok(rsp)
    }

    /// Sends `cmd` at `loc` and returns the response.
    pub fn transmit(&mut self, loc: u8, cmd: &[u8]) -> Result<Vec<u8>> {
        // The buffer size is checked against the CRB's own registers in `exchange`.
        let ordinal = command::check_command(cmd, usize::MAX)?;
        self.request_locality(loc)?;
        let r = self.exchange(loc, cmd, ordinal);
        if let Err(e) = &r {
            log::warn!("TPM command {ordinal:#x} at locality {loc}: {e}");
        }
        self.mmio.write32(loc_reg(loc, CTRL_REQ), CTRL_REQ_GO_IDLE);
        self.relinquish(loc);
        r
    }
}
