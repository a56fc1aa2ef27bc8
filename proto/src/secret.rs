//! Bytes that must never reach a log: a vTPM's state key (SAVEHASHKEY, and LOADHASHKEY's
//! answer) and the token a socket client binds with.

/// Secret bytes. `Debug` prints their length only, so a request or reply logged with `{:?}`
/// (or shown by a failed assertion) leaks nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(pub T);

impl<T: AsRef<[u8]>> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} secret bytes>", self.0.as_ref().len())
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Secret<T> {
    fn as_ref(&self) -> &[u8] {
        self.0.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_the_length_only() {
        assert_eq!(format!("{:?}", Secret(vec![0x41u8; 3])), "<3 secret bytes>");
        assert_eq!(format!("{:?}", Some(Secret([7u8; 32]))), "Some(<32 secret bytes>)");
    }
}
