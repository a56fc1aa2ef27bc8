//! xvtpmd's settings: its configuration file (`/etc/xvtpm/xvtpmd.toml`), with the command
//! line's options over it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// Where the configuration file is looked for when none is given.
pub const DEFAULT_PATH: &str = "/etc/xvtpm/xvtpmd.toml";

/// The TPM version of the vTPMs created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TpmVersion {
    /// TPM 2.0.
    #[serde(rename = "2.0")]
    V20,
    /// TPM 1.2.
    #[serde(rename = "1.2")]
    V12,
}

/// The configuration file: every key optional, none unknown.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct File {
    /// The vtpm executable.
    pub vtpm: Option<PathBuf>,
    /// Each vTPM in `<state-root>/<uuid>`.
    pub state_root: Option<PathBuf>,
    /// The vtpms' volatile snapshots.
    pub snapshot_dir: Option<PathBuf>,
    /// Create a vTPM the first time its device appears.
    pub auto_create: Option<bool>,
    /// The TPM version of the vTPMs created ("2.0" or "1.2").
    pub tpm_version: Option<TpmVersion>,
    /// The manager's vTPM socket.
    pub manager_socket: Option<PathBuf>,
    /// The manager's admin socket.
    pub admin_socket: Option<PathBuf>,
    /// The manager's group for vTPMs created here.
    pub group: Option<u32>,
    /// Serve vTPMs without keys.
    pub insecure_keyless: Option<bool>,
    /// What `xvtpm status` reads.
    pub status_file: Option<PathBuf>,
    /// How long creating one vTPM may take.
    pub create_timeout_secs: Option<u64>,
    /// Run each vtpm in its sandbox (default true).
    pub sandbox: Option<bool>,
    /// The first of the vTPMs' uids.
    pub sandbox_uid_base: Option<u32>,
    /// How many uids the vTPMs have.
    pub sandbox_uid_count: Option<u32>,
    /// The group (name or number) every vtpm is in: the manager's socket's.
    pub sandbox_group: Option<String>,
    /// Serve no vTPM here: only tell vTPMs in other domains their guests' lives.
    pub stub_domains_only: Option<bool>,
}

impl File {
    /// Reads `path`, or [`DEFAULT_PATH`] if it exists when no path is given.
    pub fn load(path: Option<&Path>) -> anyhow::Result<File> {
        let (path, must) = match path {
            Some(p) => (p, true),
            None => (Path::new(DEFAULT_PATH), false),
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text).with_context(|| format!("configuration {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must => Ok(File::default()),
            Err(e) => Err(e).with_context(|| format!("read the configuration {}", path.display())),
        }
    }

    fn parse(text: &str) -> anyhow::Result<File> {
        Ok(toml::from_str(text)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_read_and_mistakes_refused() {
        let f = File::parse(
            "auto-create = true\ntpm-version = \"1.2\"\nmanager-socket = \"/run/m.sock\"\nadmin-socket = \"/run/a.sock\"\ngroup = 3\nsandbox = false\nsandbox-group = \"xvtpm\"\nsandbox-uid-base = 100\n",
        )
        .expect("valid");
        assert_eq!((f.auto_create, f.tpm_version, f.group), (Some(true), Some(TpmVersion::V12), Some(3)));
        assert_eq!(f.manager_socket.as_deref(), Some(Path::new("/run/m.sock")));
        assert_eq!(
            (f.sandbox, f.sandbox_group.as_deref(), f.sandbox_uid_base),
            (Some(false), Some("xvtpm"), Some(100))
        );
        assert!(File::parse("auto_create = true").is_err(), "a misspelt key is an error, not ignored");
        assert!(File::parse("tpm-version = \"2\"").is_err());
        assert!(File::parse("").expect("empty").vtpm.is_none());
        let missing = File::load(Some(Path::new("/nonexistent/xvtpmd.toml")));
        assert!(missing.is_err(), "a file named on the command line must exist");
    }
}
