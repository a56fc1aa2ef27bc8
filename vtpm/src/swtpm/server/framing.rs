//! The data channel's framing: whole TPM commands (with or without the TCG prefix) in,
//! responses out, with swtpm's answers to sizes that lie and peers that trickle.

use super::*;

/// A TPM command read from the data channel.
pub(super) struct Frame {
    pub(super) command: Vec<u8>,
    /// The TCG prefix's locality, when the command came with one.
    pub(super) prefix_locality: Option<u8>,
}

/// Reads the rest of a command that arrived in pieces, all within one deadline set at the
/// first extra read.
pub(super) struct SlowReader {
    pub(super) deadline: Option<Instant>,
    pub(super) timeout: Duration,
}

impl SlowReader {
    /// Reads until `buf[..to]` is filled. `Err(None)` on a timeout (the caller picks the
    /// error), `Err(Some(..))` otherwise.
    fn fill(&mut self, s: &mut Stream, buf: &mut [u8], got: &mut usize, to: usize) -> Result<(), Option<FrameError>> {
        while *got < to {
            let deadline = *self.deadline.get_or_insert_with(|| Instant::now() + self.timeout);
            match read_until(s, &mut buf[*got..to], Some(deadline)) {
                Ok(0) => return Err(Some(FrameError::Disconnected)),
                Ok(n) => *got += n,
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(None),
                Err(e) => return Err(Some(FrameError::Io(e))),
            }
        }
        Ok(())
    }
}

pub(super) enum FrameError {
    /// The client closed in the middle of a command.
    Disconnected,
    /// The command did not complete in time.
    Timeout,
    /// The size field is unusable; answer with a size error and drop the connection.
    BadSize {
        prefixed: bool,
        why: String,
    },
    Io(io::Error),
}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::TimedOut {
            FrameError::Timeout
        } else {
            FrameError::Io(e)
        }
    }
}

pub(super) enum ReadError {
    Eof,
    Timeout,
    Io(io::Error),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Eof => f.write_str("the peer closed the connection"),
            ReadError::Timeout => f.write_str("timed out"),
            ReadError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Reads `total` more bytes of a transfer in chunks, each within `timeout`.
pub(super) fn read_chunks(
    s: &mut Stream,
    mut total: usize,
    timeout: Duration,
    mut f: impl FnMut(&[u8]),
) -> Result<(), ReadError> {
    const CHUNK: usize = 64 << 10;
    let mut buf = vec![0u8; total.min(CHUNK)];
    // `timeout` for each read, and for the whole transfer `timeout` per 64 KiB: a client that
    // trickles bytes cannot hold the control connection (and the loop serving it) for long.
    let end = Instant::now() + timeout.saturating_mul(1 + total.div_ceil(CHUNK) as u32);
    while total > 0 {
        let want = total.min(buf.len());
        match read_until(s, &mut buf[..want], Some((Instant::now() + timeout).min(end))) {
            Ok(0) => return Err(ReadError::Eof),
            Ok(n) => {
                f(&buf[..n]);
                total -= n;
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(ReadError::Timeout),
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    Ok(())
}

/// The big-endian u32 at `at`, 0 past the end (callers have checked the length).
pub(super) fn be32(b: &[u8], at: usize) -> u32 {
    tpm::be32(b, at).unwrap_or_default()
}

impl Shared {
    /// Reads the next command, first polling up to `spin` for it without sleeping; `spun_in`
    /// says whether it came while polling.
    pub(super) fn read_frame(
        &self,
        s: &mut Stream,
        spin: Duration,
        spun_in: &mut bool,
    ) -> Result<Option<Frame>, FrameError> {
        *spun_in = false;
        let max = self.buffer_size.load(Ordering::SeqCst) as usize;
        // Room for the largest command, its TCG prefix and one more byte, so a single read
        // normally brings the whole command and shows any excess: the fast path is one
        // blocking read, no timeout syscalls.
        let mut buf = vec![0u8; max.max(TPM_HEADER_SIZE) + TCG_PREFIX_SIZE + 1];
        let mut got = loop {
            if let Some(n) = s.poll_read(&mut buf, spin) {
                *spun_in = true;
                break n;
            }
            // An idle client may wait as long as it likes before a command.
            match io::Read::read(s, &mut buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(FrameError::Io(e)),
                Ok(0) => return Ok(None),
                Ok(n) => break n,
            }
        };
        // The control channel may have changed the buffer size while we waited: judge the
        // command by the size in force now.
        let max = self.buffer_size.load(Ordering::SeqCst) as usize;
        let room = max.max(TPM_HEADER_SIZE) + TCG_PREFIX_SIZE + 1;
        if buf.len() < room {
            buf.resize(room, 0);
        }
        let mut reader = SlowReader { deadline: None, timeout: self.cfg.data_timeout };
        let result = self.parse_frame(s, &mut buf, &mut got, max, &mut reader);
        if reader.deadline.is_some() {
            // The slow path set a socket timeout; the next command waits without one.
            let _ = s.set_read_timeout(None);
        }
        result
    }

    pub(super) fn parse_frame(
        &self,
        s: &mut Stream,
        buf: &mut [u8],
        got: &mut usize,
        max: usize,
        reader: &mut SlowReader,
    ) -> Result<Option<Frame>, FrameError> {
        reader.fill(s, buf, got, TPM_HEADER_SIZE).map_err(|e| e.unwrap_or(FrameError::Timeout))?;
        let mut start = 0;
        let mut prefix = None;
        let tag = u16::from_be_bytes([buf[0], buf[1]]);
        if self.version == TpmVersion::V2_0
            && tag != tpm::TPM_ST_NO_SESSIONS
            && tag != tpm::TPM_ST_SESSIONS
            && be32(buf, 0) == TPM2_SEND_COMMAND
        {
            // TCG prefix: command word, locality, length; the command starts at byte 9.
            reader
                .fill(s, buf, got, TCG_PREFIX_SIZE + TPM_HEADER_SIZE)
                .map_err(|e| e.unwrap_or(FrameError::Timeout))?;
            prefix = Some((buf[4], be32(buf, 5)));
            start = TCG_PREFIX_SIZE;
        }
        let prefixed = prefix.is_some();
        let size = be32(buf, start + 2) as usize;
        if size < TPM_HEADER_SIZE {
            return Err(FrameError::BadSize { prefixed, why: format!("size field {size} is smaller than a header") });
        }
        if size > max {
            return Err(FrameError::BadSize {
                prefixed,
                why: format!("command of {size} bytes exceeds the buffer size {max}"),
            });
        }
        if let Some((_, length)) = prefix {
            if length as usize != size {
                return Err(FrameError::BadSize {
                    prefixed,
                    why: format!("TCG prefix length {length} differs from the size field {size}"),
                });
            }
        }
        let end = start + size;
        if *got > end {
            return Err(FrameError::BadSize {
                prefixed,
                why: format!("more bytes arrived than the size field {size}"),
            });
        }
        reader.fill(s, buf, got, end).map_err(|e| {
            e.unwrap_or(FrameError::BadSize {
                prefixed,
                why: format!("size field says {size} bytes but fewer arrived within {:?}", self.cfg.data_timeout),
            })
        })?;
        Ok(Some(Frame { command: buf[start..end].to_vec(), prefix_locality: prefix.map(|(l, _)| l) }))
    }
}

/// A response as sent on the data channel: with the TCG prefix's framing (length before,
/// a zero acknowledgement after) when the command came with the prefix.
pub(super) fn frame_response(resp: &[u8], prefixed: bool) -> Vec<u8> {
    if !prefixed {
        return resp.to_vec();
    }
    let mut out = Vec::with_capacity(resp.len() + 8);
    out.extend_from_slice(&(resp.len() as u32).to_be_bytes());
    out.extend_from_slice(resp);
    out.extend_from_slice(&0u32.to_be_bytes());
    out
}
