//! Other packages' binaries for a package's tests: Cargo builds only the package's own
//! binaries before its tests, so these build (a no-op after `cargo test --workspace`) and
//! find the vtpm and vtpmmgr executables of the same profile.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The directory of the vtpm and vtpmmgr binaries of `own_exe`'s build profile (`own_exe`: a
/// `CARGO_BIN_EXE_*` of the calling package), built now if needed.
pub fn vtpm_and_vtpmmgr(own_exe: &str) -> PathBuf {
    let dir = Path::new(own_exe).parent().expect("bin dir").to_path_buf();
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // With the tests crate, as in `cargo test --workspace`: its simulated Xen is then in the
    // binaries too (`--sim`), and the build is the one the test run made.
    cargo.args(["build", "-q", "--bins", "-p", "xvtpm-vtpm", "-p", "xvtpm-vtpmmgr", "-p", "xvtpm-tests"]);
    if dir.ends_with("release") {
        cargo.arg("--release");
    }
    assert!(cargo.status().expect("cargo").success(), "building vtpm and vtpmmgr failed");
    dir
}
