//! The layout of xvtpmd's state root, which `xvtpm migrate` also reads and writes (it moves
//! an HVM guest's vTPM out of one host's root and into another's): `<root>/<uuid>/` holds
//! [`STATE`], [`TOKEN`] (the key is at the manager), [`VERSION`], and one of the markers
//! [`MADE`] (complete), [`CREATING`] (a create under way or cut short) or [`ARRIVING`] (a
//! migration's vTPM being put in place; the pid of the `xvtpm migrate-accept` doing it).

/// The default root, in `/var/lib`: the state outlives the daemon and the host's boots.
pub const DEFAULT_STATE_ROOT: &str = "/var/lib/xvtpm/vtpms";
/// The vtpm's state directory.
pub const STATE: &str = "state";
/// The token the vtpm shows the manager for the vTPM's key.
pub const TOKEN: &str = "token";
/// The TPM version the vTPM was made with: `1.2` or `2.0`.
pub const VERSION: &str = "tpm-version";
/// Written last: the vTPM is complete.
pub const MADE: &str = "made";
/// A create under way (or cut short: the next try undoes it).
pub const CREATING: &str = "creating";
/// A migration's vTPM being put in place: the pid of the `xvtpm migrate-accept` doing it.
pub const ARRIVING: &str = "arriving";
