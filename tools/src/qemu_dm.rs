//! `xvtpm qemu-dm`: the device model an HVM domain file names (`device_model_override =
//! "/usr/lib/xvtpm/xvtpm-qemu-dm"`, which runs this) to get a TPM. libxl runs it with QEMU's
//! arguments while the new domain is paused; it asks dom0's xvtpmd for the domain's TPM (keyed
//! by the domain's uuid), waits until the vtpm serves its registers, then becomes Debian's
//! QEMU with the same arguments. Whatever stops the TPM stops the domain's creation, with the
//! reason in the device model's log. At the receiving end of `xvtpm migrate` the vTPM comes
//! with the migration, after the device model must run: xvtpmd answers `arriving`, and QEMU
//! starts at once (the guest stays paused until the migration has the vTPM served).

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use xvtpm_xen::toolstack::uuid_of_vm;
use xvtpm_xen::xenbus::{
    hvm_request_path, HVM_ERROR_KEY, HVM_INCOMING_KEY, HVM_STATE_KEY, HVM_UUID_KEY, HVM_VERSION_KEY,
};
use xvtpm_xen::{TxId, Xenstore};

/// The device model libxl would have run: Debian's QEMU built for Xen.
pub const DEFAULT_QEMU: &str = "/usr/libexec/xen-qemu-system-i386";
/// How long the TPM may take: a first start creates the vTPM at the manager.
const WAIT: Duration = Duration::from_secs(90);
const TOKEN: &str = "xvtpm-qemu-dm";

/// Options of `xvtpm qemu-dm`.
#[derive(clap::Args, Debug)]
pub struct QemuDmArgs {
    /// The device model to run once the TPM is served (environment: XVTPM_QEMU).
    #[arg(long, env = "XVTPM_QEMU", value_name = "PATH", default_value = DEFAULT_QEMU)]
    qemu: PathBuf,
    /// The TPM version if the domain's vTPM is made now (a vTPM that exists keeps its own);
    /// default: xvtpmd's `tpm-version`.
    #[arg(long, value_parser = ["1.2", "2.0"])]
    tpm_version: Option<String>,
    /// QEMU's arguments, as libxl gives them (`-xen-domid N` names the domain).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "QEMU ARGS")]
    args: Vec<String>,
}

/// The domain id in QEMU's arguments.
pub fn domid_of(args: &[String]) -> Option<u16> {
    args.windows(2).find(|w| w[0] == "-xen-domid").and_then(|w| w[1].parse().ok())
}

pub fn run(a: QemuDmArgs) -> anyhow::Result<()> {
    let domid =
        domid_of(&a.args).context("no -xen-domid in the arguments: run by libxl as an HVM domain's device model")?;
    let xs = xvtpm_xen::linux::open_xenstore().context("cannot reach xenstore")?;
    let vm = xs.read_string(TxId::NONE, &format!("/local/domain/{domid}/vm")).context("the domain's vm path")?;
    let uuid = uuid_of_vm(&vm).with_context(|| format!("domain {domid}'s vm path {vm:?} names no uuid"))?;
    let started = Instant::now();
    // A restore (or a migration's receiving end): the guest runs on.
    let incoming = a.args.iter().any(|x| x == "-incoming");
    if request_tpm(&xs, domid, &uuid, a.tpm_version.as_deref(), incoming)? {
        log::info!(
            "xvtpm-qemu-dm: domain {domid}: TPM (vTPM {uuid}) served after {:.1} s",
            started.elapsed().as_secs_f64()
        );
    } else {
        log::info!("xvtpm-qemu-dm: domain {domid}: vTPM {uuid} arrives with the migration; starting the device model");
    }
    drop(xs);
    let err = std::process::Command::new(&a.qemu).args(&a.args).exec();
    bail!("cannot run {}: {err}", a.qemu.display())
}

/// Asks xvtpmd for `domid`'s TPM and waits until it is served (`true`), arriving with a
/// migration (`false`, only for an incoming domain) or refused (`Err`).
fn request_tpm(xs: &Xenstore, domid: u16, uuid: &str, version: Option<&str>, incoming: bool) -> anyhow::Result<bool> {
    let dir = hvm_request_path(domid);
    // Anything left from an earlier domain with this id is not ours.
    xs.try_rm(TxId::NONE, &dir)?;
    xs.watch(&dir, TOKEN).with_context(|| format!("watch {dir}"))?;
    xs.transaction(|tx| {
        xs.write(tx, &format!("{dir}/{HVM_UUID_KEY}"), uuid.as_bytes())?;
        if let Some(v) = version {
            xs.write(tx, &format!("{dir}/{HVM_VERSION_KEY}"), v.as_bytes())?;
        }
        if incoming {
            xs.write(tx, &format!("{dir}/{HVM_INCOMING_KEY}"), b"1")?;
        }
        xs.write(tx, &format!("{dir}/{HVM_STATE_KEY}"), b"requested")
    })
    .with_context(|| format!("write the request into {dir}"))?;
    let end = Instant::now() + WAIT;
    loop {
        let state = xs.try_read(TxId::NONE, &format!("{dir}/{HVM_STATE_KEY}"))?;
        match state.as_deref() {
            // A booting domain's TPM that serves but refuses it: as refused (a restored one
            // runs on refused rather than lose its domain; its reason is in the vtpm's log).
            Some(b"ready") => match incoming {
                true => return Ok(true),
                false => match xs.try_read(TxId::NONE, &format!("{dir}/{HVM_ERROR_KEY}"))? {
                    Some(why) => bail!("domain {domid}: its TPM refuses it: {}", String::from_utf8_lossy(&why)),
                    None => return Ok(true),
                },
            },
            Some(b"arriving") if incoming => return Ok(false),
            Some(b"refused") => {
                let why = xs.try_read(TxId::NONE, &format!("{dir}/{HVM_ERROR_KEY}"))?.unwrap_or_default();
                bail!("domain {domid}: xvtpmd refused its TPM: {}", String::from_utf8_lossy(&why));
            }
            _ => {}
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let _ = xs.try_rm(TxId::NONE, &dir);
            bail!("domain {domid}: no TPM after {WAIT:?}: is xvtpmd running in dom0? (systemctl status xvtpmd)");
        }
        xs.next_event(Some(left))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_domain_comes_from_qemus_arguments() {
        let args: Vec<String> =
            ["-xen-domid", "7", "-no-shutdown", "-m", "256"].iter().map(|s| s.to_string()).collect();
        assert_eq!(domid_of(&args), Some(7));
        assert_eq!(domid_of(&args[1..]), None);
        assert_eq!(domid_of(&["-xen-domid".to_string(), "x".to_string()]), None);
    }
}
