//! Timeouts A-D and command durations: TPM 2.0 defaults from the PC Client PTP specification,
//! TPM 1.2 values read from the TPM with the known unit quirks.

use std::time::Duration;

use crate::Family;

/// The interface timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A: locality access.
    pub a: Duration,
    /// B: commandReady / cmdReady.
    pub b: Duration,
    /// C: stsValid.
    pub c: Duration,
    /// D: burstCount and dataAvail within a transfer.
    pub d: Duration,
}

/// How long commands may execute before they are cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durations {
    /// Short commands (reads of state, PCR operations).
    pub short: Duration,
    /// Medium commands (seal, sign, load).
    pub medium: Duration,
    /// Long commands (self test, key generation on TPM 1.2).
    pub long: Duration,
    /// TPM 2.0 key generation (CreatePrimary, Create, CreateLoaded).
    pub long_long: Duration,
}

/// Longest duration or timeout a TPM may set for itself: a TPM reporting hours would turn a
/// hang into one.
pub const MAX_WAIT: Duration = Duration::from_secs(300);

const fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl Timeouts {
    /// Defaults for a family (PTP for 2.0; TIS 1.2 for 1.2).
    pub fn default_for(family: Family) -> Self {
        match family {
            Family::Tpm20 => Timeouts { a: ms(750), b: ms(2000), c: ms(200), d: ms(30) },
            Family::Tpm12 => Timeouts { a: ms(750), b: ms(2000), c: ms(750), d: ms(750) },
        }
    }

    /// TPM 1.2: applies the values of TPM_GetCapability(TPM_CAP_PROPERTY,
    /// TPM_CAP_PROP_TIS_TIMEOUT) in microseconds. A zero keeps the default; values that look
    /// like milliseconds (A below 1000) are scaled, as some TPMs report the wrong unit.
    pub fn from_tpm12(reported: [u32; 4]) -> (Self, bool) {
        let def = Self::default_for(Family::Tpm12);
        let defaults = [def.a, def.b, def.c, def.d];
        let scale = reported[0] != 0 && reported[0] < 1000;
        let mut adjusted = scale;
        let mut v = [Duration::ZERO; 4];
        for i in 0..4 {
            v[i] = match reported[i] {
                0 => {
                    adjusted = true;
                    defaults[i]
                }
                us if scale => Duration::from_millis(u64::from(us)),
                us => Duration::from_micros(u64::from(us)),
            }
            .min(MAX_WAIT);
        }
        (Timeouts { a: v[0], b: v[1], c: v[2], d: v[3] }, adjusted)
    }
}

impl Durations {
    /// Defaults for a family.
    pub fn default_for(family: Family) -> Self {
        match family {
            Family::Tpm20 => Durations { short: ms(20), medium: ms(750), long: ms(2000), long_long: ms(300_000) },
            // TPM 1.2 has no fixed defaults; these are what Linux falls back to.
            Family::Tpm12 => Durations { short: ms(2000), medium: ms(20_000), long: ms(60_000), long_long: ms(60_000) },
        }
    }

    /// TPM 1.2: applies TPM_GetCapability(TPM_CAP_PROPERTY, TPM_CAP_PROP_DURATION) in
    /// microseconds. A zero keeps the default; a short duration under 10 ms means the TPM
    /// reported milliseconds: short becomes 1 s and medium and long are scaled.
    pub fn from_tpm12(reported: [u32; 3]) -> (Self, bool) {
        let def = Self::default_for(Family::Tpm12);
        let us = |v: u32, d: Duration| if v == 0 { d } else { Duration::from_micros(u64::from(v)) };
        let mut out = Durations {
            short: us(reported[0], def.short),
            medium: us(reported[1], def.medium),
            long: us(reported[2], def.long),
            long_long: def.long_long,
        };
        let mut adjusted = reported.contains(&0);
        if reported[0] != 0 && out.short < ms(10) {
            out.short = ms(1000);
            out.medium = out.medium.saturating_mul(1000);
            out.long = out.long.saturating_mul(1000);
            adjusted = true;
        }
        out.short = out.short.min(MAX_WAIT);
        out.medium = out.medium.min(MAX_WAIT);
        out.long = out.long.min(MAX_WAIT);
        out.long_long = out.long_long.max(out.long).min(MAX_WAIT);
        (out, adjusted)
    }

    /// How long `ordinal` may run.
    pub fn for_ordinal(&self, family: Family, ordinal: u32) -> Duration {
        match family {
            // Linux's table (tpm2_ordinal_duration_index).
            Family::Tpm20 => match ordinal {
                // VerifySignature, CreatePrimary, Create, CreateLoaded.
                0x177 | 0x131 | 0x153 | 0x191 => self.long_long,
                // SelfTest, GetRandom, HierarchyControl, HierarchyChangeAuth, NV_Read.
                0x143 | 0x17B | 0x121 | 0x129 | 0x14E => self.long,
                // Startup, sequences, PCR_Extend, GetCapability.
                0x144 | 0x15C | 0x13E | 0x185 | 0x186 | 0x182 | 0x17A => self.medium,
                // Everything else: Linux's TPM2 default of 120 s, bounded by long_long.
                _ => ms(120_000).min(self.long_long),
            },
            Family::Tpm12 => match ordinal {
                // TakeOwnership, CreateWrapKey, MakeIdentity, CreateEndorsementKeyPair,
                // CreateRevocableEK, SelfTestFull, ContinueSelfTest.
                0x0D | 0x1F | 0x79 | 0x78 | 0x7F | 0x50 | 0x53 => self.long,
                // Seal, Unseal, Quote, Sign, LoadKey2, UnBind, Quote2, OwnerClear.
                0x17 | 0x18 | 0x16 | 0x3C | 0x41 | 0x1E | 0x3E | 0x5B => self.medium,
                _ => self.short.max(self.medium),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tpm12_timeouts_in_microseconds_are_taken_as_is() {
        let (t, adj) = Timeouts::from_tpm12([750_000, 2_000_000, 750_000, 750_000]);
        assert_eq!(t, Timeouts::default_for(Family::Tpm12));
        assert!(!adj);
    }

    #[test]
    fn tpm12_timeouts_in_milliseconds_are_scaled_and_zeros_take_defaults() {
        let (t, adj) = Timeouts::from_tpm12([750, 2000, 0, 750]);
        assert_eq!((t.a, t.b, t.c, t.d), (ms(750), ms(2000), ms(750), ms(750)));
        assert!(adj);
        let (t, _) = Timeouts::from_tpm12([u32::MAX; 4]);
        assert_eq!(t.a, MAX_WAIT, "a TPM cannot make us wait for an hour");
    }

    #[test]
    fn tpm12_durations_quirks() {
        let (d, adj) = Durations::from_tpm12([2_000_000, 20_000_000, 60_000_000]);
        assert_eq!((d.short, d.medium, d.long), (ms(2000), ms(20_000), ms(60_000)));
        assert!(!adj);
        // Milliseconds reported as microseconds (the Broadcom quirk).
        let (d, adj) = Durations::from_tpm12([2000, 20_000, 60_000]);
        assert_eq!((d.short, d.medium, d.long), (ms(1000), ms(20_000), ms(60_000)));
        assert!(adj);
        let (d, adj) = Durations::from_tpm12([0, 0, 0]);
        assert_eq!(d, Durations::default_for(Family::Tpm12));
        assert!(adj);
    }

    #[test]
    fn ordinals_get_their_class() {
        let d = Durations::default_for(Family::Tpm20);
        assert_eq!(d.for_ordinal(Family::Tpm20, 0x131), ms(300_000));
        assert_eq!(d.for_ordinal(Family::Tpm20, 0x17B), ms(2000));
        assert_eq!(d.for_ordinal(Family::Tpm20, 0x182), ms(750));
        assert_eq!(d.for_ordinal(Family::Tpm20, 0x1234), ms(120_000));
        let d = Durations::default_for(Family::Tpm12);
        assert_eq!(d.for_ordinal(Family::Tpm12, 0x0D), ms(60_000));
        assert_eq!(d.for_ordinal(Family::Tpm12, 0x46), ms(20_000));
    }
}
