//! One link setting for the `vtpm` and `xvtpm-swtpm` executables, which run once per guest:
//! the unwinder is linked statically (gcc's `libgcc_eh.a`) instead of mapping `libgcc_s.so.1`
//! into every vTPM, whose relocated data is private to each process (measured with 100 vTPMs
//! running, `benches/density.rs`: 8 KiB less private memory and 9 KiB less PSS per vTPM). Rust's std asks for
//! `-lgcc_s`; a directory holding `libgcc_s.a` (a link to `libgcc_eh.a`) searched before gcc's
//! own makes the linker take the archive. Panics unwind the same way. Without `libgcc_eh.a`
//! the executables link the shared unwinder, with a build warning.
//!
//! Only the package's own executables get it (`rustc-link-arg-bins`); tests, benches and other
//! crates link as usual.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CC");
    let linux_gnu = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu");
    if !linux_gnu {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    match static_unwinder(&out) {
        Some(dir) => println!("cargo:rustc-link-arg-bins=-L{}", dir.display()),
        // Not fatal: the executables then map libgcc_s.so.1 like any Rust program.
        None => println!("cargo:warning=libgcc_eh.a not found: vtpm links the shared unwinder"),
    }
}

/// A directory whose `libgcc_s.a` is the compiler's `libgcc_eh.a`.
fn static_unwinder(out: &Path) -> Option<PathBuf> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let found = Command::new(cc).arg("-print-file-name=libgcc_eh.a").output().ok()?;
    // gcc prints the bare name when it has no such file.
    let eh = PathBuf::from(String::from_utf8(found.stdout).ok()?.trim());
    if !eh.is_absolute() || !eh.is_file() {
        return None;
    }
    let dir = out.join("static-unwinder");
    std::fs::create_dir_all(&dir).ok()?;
    let link = dir.join("libgcc_s.a");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&eh, &link).ok()?;
    Some(dir)
}
