//! The driver for whatever TPM sits at the MMIO window: detects the interface (TIS 1.2, PTP
//! FIFO, CRB) and the family, reads the TPM's own timing and buffer size, and transmits.

use crate::clock::Clock;
use crate::command::probe;
use crate::crb::Crb;
use crate::fifo::Fifo;
use crate::mmio::{loc_reg, Mmio};
use crate::regs::{crb as crb_regs, fifo as fifo_regs, intf};
use crate::timeouts::{Durations, Timeouts};
use crate::{Error, Family, HwTpm, Result};

/// The register interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interface {
    /// TIS 1.2/1.3 FIFO (TPM_INTERFACE_ID reads all ones).
    Tis,
    /// The PC Client PTP FIFO of TPM 2.0.
    PtpFifo,
    /// Command Response Buffer.
    Crb,
}

/// What the TPM says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Register interface.
    pub interface: Interface,
    /// TPM family.
    pub family: Family,
    /// TCG vendor id.
    pub vendor_id: u16,
    /// Device id.
    pub device_id: u16,
    /// Revision id.
    pub revision: u8,
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TPM {} over {:?} (vendor {:#06x}, device {:#06x}, revision {:#04x})",
            self.family, self.interface, self.vendor_id, self.device_id, self.revision
        )
    }
}

#[derive(Debug)]
enum Driver<M, C> {
    Fifo(Fifo<M, C>),
    Crb(Crb<M, C>),
}

/// A TPM on its MMIO window.
#[derive(Debug)]
pub struct Tis<M, C> {
    driver: Driver<M, C>,
    info: DeviceInfo,
}

/// Reads the interface registers of locality 0: interface, vendor, device, revision.
pub fn identify(m: &mut impl Mmio) -> Result<(Interface, u16, u16, u8)> {
    let id = m.read32(loc_reg(0, fifo_regs::INTERFACE_ID));
    let kind = match id & 0xF {
        _ if id == u32::MAX => Interface::Tis,
        intf::TYPE_CRB => Interface::Crb,
        intf::TYPE_FIFO => Interface::PtpFifo,
        intf::TYPE_TIS => Interface::Tis,
        other => return Err(Error::NoDevice(format!("unknown interface type {other:#x} (INTERFACE_ID {id:#010x})"))),
    };
    let (vid, did, rid) = match kind {
        Interface::Crb => {
            let hi = m.read32(loc_reg(0, crb_regs::INTF_ID_HI));
            (hi as u16, (hi >> 16) as u16, (id >> 24) as u8)
        }
        _ => {
            let dv = m.read32(loc_reg(0, fifo_regs::DID_VID));
            (dv as u16, (dv >> 16) as u16, m.read8(loc_reg(0, fifo_regs::RID)))
        }
    };
    if matches!((vid, did), (0xFFFF, 0xFFFF) | (0, 0)) {
        return Err(Error::NoDevice(format!("vendor/device id {vid:#06x}/{did:#06x}: nothing answers at the window")));
    }
    Ok((kind, vid, did, rid))
}

impl<M: Mmio, C: Clock> Tis<M, C> {
    /// Detects the TPM at `mmio` and gets the driver ready: interface from the registers,
    /// family by a TPM2_GetCapability probe on FIFO interfaces (a TPM 1.2 answers with a 1.2
    /// tag), then the TPM's own timing and buffer size where it reports them.
    pub fn probe(mut mmio: M, clock: C) -> Result<Self> {
        let (interface, vendor_id, device_id, revision) = identify(&mut mmio)?;
        let (driver, family) = match interface {
            Interface::Crb => (Driver::Crb(Crb::new(mmio, clock)), Family::Tpm20),
            Interface::Tis | Interface::PtpFifo => {
                let ptp = interface == Interface::PtpFifo;
                // The longer TPM 1.2 timeouts until the family is known.
                let mut f = Fifo::new(mmio, clock, Family::Tpm12, ptp);
                let rsp = f.transmit(0, &probe::tpm2_get_properties(probe::TPM2_PT_MAX_COMMAND_SIZE, 2))?;
                let family = if probe::is_tpm2_response(&rsp) { Family::Tpm20 } else { Family::Tpm12 };
                let (m, c) = f.into_parts();
                (Driver::Fifo(Fifo::new(m, c, family, ptp)), family)
            }
        };
        let mut tis = Tis { driver, info: DeviceInfo { interface, family, vendor_id, device_id, revision } };
        tis.refresh();
        log::info!("{}", tis.info);
        Ok(tis)
    }

    /// The register window (tests reach their model through it).
    pub fn mmio_mut(&mut self) -> &mut M {
        match &mut self.driver {
            Driver::Fifo(f) => f.mmio(),
            Driver::Crb(c) => c.mmio(),
        }
    }

    /// What was detected.
    pub fn info(&self) -> DeviceInfo {
        self.info
    }

    /// Timeouts in force.
    pub fn timeouts(&self) -> Timeouts {
        match &self.driver {
            Driver::Fifo(f) => f.timeouts(),
            Driver::Crb(c) => c.timeouts(),
        }
    }

    /// Durations in force.
    pub fn durations(&self) -> Durations {
        match &self.driver {
            Driver::Fifo(f) => f.durations(),
            Driver::Crb(c) => c.durations(),
        }
    }

    /// The largest command and response on a FIFO (CRB: its buffer registers say).
    pub fn max_buffer(&self) -> Option<usize> {
        match &self.driver {
            Driver::Fifo(f) => Some(f.max_buffer()),
            Driver::Crb(_) => None,
        }
    }

    /// Reads what the TPM reports of itself: TPM 1.2 timeouts and durations, and on a FIFO the
    /// buffer size. A TPM not started yet does not answer; call again after TPM_Startup.
    /// Returns whether the TPM answered.
    pub fn refresh(&mut self) -> bool {
        let Driver::Fifo(f) = &mut self.driver else { return true };
        match f.family() {
            Family::Tpm12 => {
                let t = f.transmit(0, &probe::tpm12_get_property(probe::TPM12_PROP_TIS_TIMEOUT)).ok();
                let d = f.transmit(0, &probe::tpm12_get_property(probe::TPM12_PROP_DURATION)).ok();
                let b = f.transmit(0, &probe::tpm12_get_property(probe::TPM12_PROP_INPUT_BUFFER)).ok();
                let t = t.as_deref().and_then(probe::parse_tpm12_u32s::<4>);
                let d = d.as_deref().and_then(probe::parse_tpm12_u32s::<3>);
                let b = b.as_deref().and_then(probe::parse_tpm12_u32s::<1>);
                let (Some(t), Some(d)) = (t, d) else {
                    log::debug!("TPM 1.2 did not report its timing (not started?); keeping defaults");
                    return false;
                };
                let (timeouts, ta) = Timeouts::from_tpm12(t);
                let (durations, da) = Durations::from_tpm12(d);
                if ta || da {
                    log::info!("TPM 1.2 timing adjusted (reported timeouts {t:?} µs, durations {d:?} µs)");
                }
                f.set_timing(timeouts, durations);
                if let Some([n]) = b {
                    f.set_max_buffer(n as usize);
                }
                true
            }
            Family::Tpm20 => {
                let r = f.transmit(0, &probe::tpm2_get_properties(probe::TPM2_PT_MAX_COMMAND_SIZE, 2)).ok();
                let Some(props) = r.as_deref().and_then(probe::parse_tpm2_properties) else {
                    log::debug!("TPM 2.0 did not report its buffer sizes (not started?); keeping 4096");
                    return false;
                };
                let find = |p: u32| props.iter().find(|(k, _)| *k == p).map(|(_, v)| *v as usize);
                if let (Some(c), Some(r)) =
                    (find(probe::TPM2_PT_MAX_COMMAND_SIZE), find(probe::TPM2_PT_MAX_COMMAND_SIZE + 1))
                {
                    f.set_max_buffer(c.max(r));
                }
                true
            }
        }
    }
}

impl<M: Mmio, C: Clock> HwTpm for Tis<M, C> {
    fn transmit(&mut self, locality: u8, command: &[u8]) -> Result<Vec<u8>> {
        match &mut self.driver {
            Driver::Fifo(f) => f.transmit(locality, command),
            Driver::Crb(c) => c.transmit(locality, command),
        }
    }

    fn family(&self) -> Family {
        self.info.family
    }

    fn describe(&self) -> String {
        self.info.to_string()
    }
}
