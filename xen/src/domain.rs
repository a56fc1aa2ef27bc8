//! What the hypervisor says of a domain: whether it shut down, and why. Unlike anything in
//! xenstore, a guest cannot write this: its shutdown reason is the one it gave Xen when it
//! stopped (`SCHEDOP_shutdown`), so a suspend read here really stopped the guest.

/// Why a domain shut down: the `SHUTDOWN_*` codes of Xen's `public/sched.h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownReason {
    /// `SHUTDOWN_poweroff` (0).
    Poweroff,
    /// `SHUTDOWN_reboot` (1).
    Reboot,
    /// `SHUTDOWN_suspend` (2): the guest stopped to be saved or migrated, or to be resumed in
    /// place (a checkpoint).
    Suspend,
    /// `SHUTDOWN_crash` (3).
    Crash,
    /// `SHUTDOWN_watchdog` (4).
    Watchdog,
    /// `SHUTDOWN_soft_reset` (5).
    SoftReset,
    /// A code this build does not know.
    Other(u8),
}

impl ShutdownReason {
    /// The reason of Xen's code.
    pub fn from_code(code: u8) -> Self {
        match code {
            0 => ShutdownReason::Poweroff,
            1 => ShutdownReason::Reboot,
            2 => ShutdownReason::Suspend,
            3 => ShutdownReason::Crash,
            4 => ShutdownReason::Watchdog,
            5 => ShutdownReason::SoftReset,
            c => ShutdownReason::Other(c),
        }
    }

    /// Xen's code of the reason.
    pub fn code(self) -> u8 {
        match self {
            ShutdownReason::Poweroff => 0,
            ShutdownReason::Reboot => 1,
            ShutdownReason::Suspend => 2,
            ShutdownReason::Crash => 3,
            ShutdownReason::Watchdog => 4,
            ShutdownReason::SoftReset => 5,
            ShutdownReason::Other(c) => c,
        }
    }
}

impl std::fmt::Display for ShutdownReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShutdownReason::Poweroff => f.write_str("poweroff"),
            ShutdownReason::Reboot => f.write_str("reboot"),
            ShutdownReason::Suspend => f.write_str("suspend"),
            ShutdownReason::Crash => f.write_str("crash"),
            ShutdownReason::Watchdog => f.write_str("watchdog"),
            ShutdownReason::SoftReset => f.write_str("soft_reset"),
            ShutdownReason::Other(c) => write!(f, "reason {c}"),
        }
    }
}

/// A domain as the hypervisor reports it (`XEN_DOMCTL_getdomaininfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainInfo {
    /// Shut down, and why; `None` while it runs (or is paused).
    pub shutdown: Option<ShutdownReason>,
    /// Being destroyed (what it shut down for stays readable until it is gone).
    pub dying: bool,
}

/// `XEN_DOMINF_dying`.
const DOMINF_DYING: u32 = 1 << 0;
/// `XEN_DOMINF_shutdown`.
const DOMINF_SHUTDOWN: u32 = 1 << 2;
/// `XEN_DOMINF_shutdownshift`: the shutdown code sits in bits 16..24 of the flags.
const DOMINF_SHUTDOWN_SHIFT: u32 = 16;

impl DomainInfo {
    /// A running domain.
    pub const RUNNING: DomainInfo = DomainInfo { shutdown: None, dying: false };

    /// The info of `getdomaininfo`'s `flags` (`XEN_DOMINF_*`).
    pub fn from_flags(flags: u32) -> Self {
        // The code is only meaningful once the domain has shut down.
        let shutdown = (flags & DOMINF_SHUTDOWN != 0)
            .then(|| ShutdownReason::from_code(((flags >> DOMINF_SHUTDOWN_SHIFT) & 0xff) as u8));
        DomainInfo { shutdown, dying: flags & DOMINF_DYING != 0 }
    }

    /// The `flags` that say this (the inverse of [`DomainInfo::from_flags`]).
    pub fn to_flags(self) -> u32 {
        let mut flags = if self.dying { DOMINF_DYING } else { 0 };
        if let Some(r) = self.shutdown {
            flags |= DOMINF_SHUTDOWN | (u32::from(r.code()) << DOMINF_SHUTDOWN_SHIFT);
        }
        flags
    }
}

impl std::fmt::Display for DomainInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.shutdown, self.dying) {
            (None, false) => f.write_str("running"),
            (None, true) => f.write_str("dying"),
            (Some(r), false) => write!(f, "shut down ({r})"),
            (Some(r), true) => write!(f, "dying, shut down ({r})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_say_whether_and_why_a_domain_shut_down() {
        // Values as Xen reports them: running + blocked; shut down for a suspend and paused;
        // dying after a crash.
        assert_eq!(DomainInfo::from_flags(0x10), DomainInfo::RUNNING);
        let suspended = DomainInfo::from_flags(0x0002_0004 | 0x08);
        assert_eq!(suspended, DomainInfo { shutdown: Some(ShutdownReason::Suspend), dying: false });
        let crashed = DomainInfo::from_flags(0x0003_0005);
        assert_eq!(crashed, DomainInfo { shutdown: Some(ShutdownReason::Crash), dying: true });
        // A code without the shutdown flag is not a shutdown.
        assert_eq!(DomainInfo::from_flags(0x0002_0000).shutdown, None);
        for code in 0..=255u8 {
            let info = DomainInfo { shutdown: Some(ShutdownReason::from_code(code)), dying: code % 2 == 0 };
            assert_eq!(DomainInfo::from_flags(info.to_flags()), info);
            assert_eq!(ShutdownReason::from_code(code).code(), code);
        }
        assert_eq!(suspended.to_string(), "shut down (suspend)");
        assert_eq!(ShutdownReason::Other(9).to_string(), "reason 9");
    }
}
