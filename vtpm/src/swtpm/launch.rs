//! Starting a TPM from swtpm's `socket` command line: what both `vtpm socket` and the
//! `xvtpm-swtpm` drop-in run.

use std::sync::Arc;

use crate::libtpms::{Libtpms, LibtpmsConfig};
use crate::state::file::{FileStore, StateKey};
use crate::swtpm::cli::{self, KeySource};
use crate::swtpm::SwtpmServer;
use crate::{Error, Result};

/// Parses swtpm's options (`args[0]` is `socket`), opens the state and serves until the
/// control channel's STOP or a fatal error. `create_missing` creates a TPM when the state
/// directory holds none (swtpm's habit); a state that exists but does not load is never
/// replaced.
pub fn run(args: &[String], create_missing: bool) -> Result<()> {
    let inv = cli::parse_swtpm_args(args)?;
    if let Some(text) = inv.print_and_exit {
        print!("{text}");
        return Ok(());
    }
    if let Some(p) = &inv.pid_file {
        cli::write_pid_file(p)?;
    }
    let state = inv.state.as_ref().ok_or_else(|| Error::Config("--tpmstate dir=<dir> is required".into()))?;
    let key = match &inv.key {
        Some(spec) => {
            let bytes = spec.read_key()?;
            if spec.remove {
                if let KeySource::File(p) = &spec.source {
                    let _ = std::fs::remove_file(p);
                }
            }
            Some(StateKey::from_bytes(&bytes).map_err(Error::Config)?)
        }
        None => None,
    };
    // swtpm's default when `mode=` is absent.
    let store = FileStore::open_with_mode(&state.dir, key, state.mode.unwrap_or(0o640))?;
    let engine = Libtpms::new(LibtpmsConfig {
        version: inv.tpm_version,
        store: Box::new(store),
        create: create_missing,
        label: state.dir.clone(),
    })?;
    let mut config = inv.server;
    // CMD_SET_DATAFD (QEMU, Cloud Hypervisor) passes the data channel over the control socket.
    config.fd_receiver = Some(Arc::new(|sock: &std::os::unix::net::UnixStream, buf: &mut [u8]| {
        crate::sys::fdpass::recv_with_fd(sock, buf)
    }));
    let server = SwtpmServer::new(config, Box::new(engine))?;
    log::info!("swtpm-compatible socket mode ({:?}) on {}", inv.tpm_version, state.dir.display());
    server.run()
}
