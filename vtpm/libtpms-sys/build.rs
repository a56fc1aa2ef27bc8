//! Links the system libtpms (Debian: libtpms-dev).
fn main() {
    println!("cargo:rustc-link-lib=tpms");
}
