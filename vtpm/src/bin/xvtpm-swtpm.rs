//! `xvtpm-swtpm`: our vTPM behind swtpm's command line and nothing else, for tools and suites
//! written against swtpm. Install it as `swtpm` (a symlink is enough): `swtpm socket --tpm2
//! --server type=tcp,port=2321 --ctrl type=tcp,port=2322 --tpmstate dir=D --flags
//! not-need-init,startup-clear`. Like swtpm, it creates a TPM in a state directory that has
//! none; a state that exists but does not authenticate or decrypt stops it with an error.
//!
//! A separate executable from `vtpm` because it is small: it links only the socket mode (no
//! Xen backend, no clap), so an idle instance's resident size is about swtpm's.

#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    xvtpm_vtpm::sys::malloc::one_arena();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    Ok(xvtpm_vtpm::swtpm::launch::run(&args, true)?)
}
