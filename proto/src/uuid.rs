//! The uuid that names a vTPM: 16 bytes on the wire, 8-4-4-4-12 hex digits in xenstore,
//! on command lines and in file names.

use crate::Error;

/// A uuid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// A version-4 uuid from 16 random bytes (the caller's random source: this crate does no
    /// I/O).
    pub fn from_random(mut b: [u8; 16]) -> Self {
        b[6] = (b[6] & 0x0F) | 0x40;
        b[8] = (b[8] & 0x3F) | 0x80;
        Self(b)
    }

    /// Parses the text form (8-4-4-4-12 hex digits, either case, surrounding white space
    /// ignored).
    pub fn parse(s: &str) -> Result<Self, Error> {
        let t = s.trim();
        let bad = || Error::Malformed(format!("malformed uuid {s:?} (expected 8-4-4-4-12 hex digits)"));
        let shaped = t.len() == 36
            && t.char_indices().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == '-',
                _ => c.is_ascii_hexdigit(),
            });
        if !shaped {
            return Err(bad());
        }
        let hex: Vec<u8> = t.bytes().filter(|c| *c != b'-').collect();
        let mut u = [0u8; 16];
        for (b, pair) in u.iter_mut().zip(hex.chunks_exact(2)) {
            let s = std::str::from_utf8(pair).map_err(|_| bad())?;
            *b = u8::from_str_radix(s, 16).map_err(|_| bad())?;
        }
        Ok(Self(u))
    }

    /// The 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The uuid of the first 16 bytes of `b`, if there are 16.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        b.get(..16).and_then(|s| s.try_into().ok()).map(Self)
    }
}

impl From<[u8; 16]> for Uuid {
    fn from(b: [u8; 16]) -> Self {
        Self(b)
    }
}

impl std::str::FromStr for Uuid {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

impl std::fmt::Display for Uuid {
    /// Lower case, 8-4-4-4-12.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_bad_text_is_refused() {
        let s = "0123abcd-4567-89ef-0011-2233445566ff";
        let u = Uuid::parse(s).expect("valid");
        assert_eq!(u.0[0], 0x01);
        assert_eq!(u.0[15], 0xff);
        assert_eq!(u.to_string(), s);
        assert_eq!(Uuid::parse(&s.to_uppercase()).expect("upper case"), u);
        assert_eq!(Uuid::parse(&format!(" {s}\n")).expect("trimmed"), u);
        for bad in [
            "",
            "0123abcd45678-9ef-0011-2233445566ff",
            "0123abcd-4567-89ef-0011-2233445566f",
            "0123abcd-4567-89ef-0011-2233445566fg",
            "0123abcd-4567-89ef-0011-2233445566ff0",
            "0123abcd-4567-89ef-0011-2233445566\u{e9}",
        ] {
            assert!(Uuid::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn random_uuids_are_version_4() {
        let u = Uuid::from_random([0xff; 16]);
        assert_eq!(u.0[6] >> 4, 4);
        assert_eq!(u.0[8] >> 6, 2);
        assert_eq!(Uuid::from_slice(&[1; 17]), Some(Uuid([1; 16])));
        assert_eq!(Uuid::from_slice(&[1; 15]), None);
    }
}
