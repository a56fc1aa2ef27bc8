//! Live migration of a guest with its vTPM: `xvtpm migrate DOMAIN HOST` runs `xl migrate` with
//! our relay as its transport (`relay`), which hands the vTPM to `xvtpm migrate-accept` at
//! the destination (`accept`) between the guest's suspend and its resume there (`wire`: the
//! channel). libxl has no hook for a vtpm device's state, so the wrapper is needed: plain `xl
//! migrate` would start the guest at the destination without its vTPM.

pub mod accept;
pub mod relay;
pub mod wire;

/// Locks a mutex a panicked thread may have held: the streams it guards stay usable.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use clap::Args;
use xvtpm_vtpmmgr::admin::Admin;

use crate::XenOpts;

/// `xvtpm migrate`'s arguments.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The guest (its name, as `xl list` shows it).
    pub domain: String,
    /// The destination host, as the transport reaches it.
    pub host: String,
    /// The destination manager's migration key (`xvtpm vtpm migration-key` there): the hex
    /// digits, or a file holding them. The destination must trust this manager's
    /// (`xvtpm vtpm trust-source`).
    #[arg(long, value_name = "KEY|FILE")]
    pub to: String,
    /// The vTPM's uuid at the manager (`vtpm serve --vtpm-uuid`).
    #[arg(long)]
    pub vtpm_uuid: String,
    /// Its state directory here (`vtpm serve --state-dir`).
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Its token file here (`vtpm serve --token-file`).
    #[arg(long, value_name = "FILE")]
    pub token_file: PathBuf,
    /// The vtpm's snapshot directory here (`vtpm serve --snapshot-dir`).
    #[arg(long, value_name = "DIR", default_value = xvtpm_vtpm::snapshot::DEFAULT_DIR)]
    pub snapshot_dir: PathBuf,
    /// A TPM 1.2.
    #[arg(long = "tpm1.2")]
    pub tpm12: bool,
    /// The transport to the destination: a shell command whose stdin and stdout reach `xvtpm
    /// migrate-accept` there; `{host}` stands for HOST.
    #[arg(long, value_name = "CMD", default_value = "ssh {host} xvtpm migrate-accept")]
    pub via: String,
    /// This host's manager: its admin socket.
    #[arg(long, value_name = "PATH", default_value = "/run/xvtpm/admin.sock")]
    pub admin_socket: PathBuf,
    #[command(flatten)]
    pub xen: XenOpts,
}

/// The vtpm device uuid of domain `name`'s first vtpm device.
fn device_uuid(xen: &XenOpts, name: &str) -> anyhow::Result<String> {
    let xs = xen.open()?.xenstore()?;
    let tx = xvtpm_xen::TxId::NONE;
    for d in xs.directory(tx, "/local/domain")? {
        let Ok(id) = d.parse::<u16>() else { continue };
        if xs.try_read(tx, &format!("/local/domain/{id}/name"))?.as_deref() != Some(name.as_bytes()) {
            continue;
        }
        let devices = xs.directory(tx, &format!("/local/domain/0/backend/vtpm/{id}")).unwrap_or_default();
        let Some(h) = devices.first() else { bail!("domain {name} ({id}) has no vtpm device served from dom0") };
        let uuid = xs.try_read(tx, &format!("/local/domain/0/backend/vtpm/{id}/{h}/uuid"))?;
        return Ok(String::from_utf8_lossy(&uuid.context("the device has no uuid")?).into_owned());
    }
    bail!("no domain named {name}")
}

/// Runs `xvtpm migrate`.
pub fn migrate(a: MigrateArgs) -> anyhow::Result<()> {
    let device_uuid = device_uuid(&a.xen, &a.domain)?;
    let to = xvtpm_vtpmmgr::hex(&crate::admin::migration_key_arg(&a.to)?);
    let state_dir = std::fs::canonicalize(&a.state_dir).with_context(|| format!("{}", a.state_dir.display()))?;
    let snapshots = xvtpm_vtpm::snapshot::SnapshotFile::for_state_dir(&a.snapshot_dir, &state_dir)?.paths().clone();
    let run = PathBuf::from("/run/xvtpm");
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&run)?;
    let base = run.join(format!("migrate-{}", std::process::id()));
    let plan = relay::Plan {
        via: a.via.clone(),
        admin_socket: a.admin_socket.clone(),
        to,
        device_uuid: device_uuid.clone(),
        vtpm_uuid: a.vtpm_uuid.clone(),
        tpm12: a.tpm12,
        state_dir,
        token_file: a.token_file.clone(),
        snapshots: snapshots.clone(),
        status: base.with_extension("status"),
    };
    let plan_file = base.with_extension("json");
    let mut f = std::fs::OpenOptions::new().create_new(true).write(true).mode(0o600).open(&plan_file)?;
    std::io::Write::write_all(&mut f, &serde_json::to_vec(&plan)?)?;
    drop(f);
    let exe = std::env::current_exe().context("this executable")?;
    let transport = format!("{} migrate-relay --plan {}", exe.display(), plan_file.display());
    log::info!("migrating {} (vtpm device {device_uuid}) to {}", a.domain, a.host);
    let status = Command::new("xl").args(["migrate", "-s", &transport, &a.domain, &a.host]).status();
    let progress = std::fs::read_to_string(&plan.status).unwrap_or_default();
    let _ = std::fs::remove_file(&plan_file);
    let _ = std::fs::remove_file(&plan.status);
    let uuid = crate::admin::uuid_arg(&a.vtpm_uuid)?;
    match status {
        Ok(s) if s.success() => {
            // The guest and its vTPM run at the destination: this manager lets the vTPM go.
            Admin::connect(&a.admin_socket)?.delete(&uuid)?;
            for p in &snapshots {
                let _ = std::fs::remove_file(p);
            }
            outln!("{} moved to {} with its vTPM {}; stop its vtpm here", a.domain, a.host, a.vtpm_uuid);
            Ok(())
        }
        _ if progress == "go" => bail!(
            "xl migrate failed after the guest was cleared to run at {}: its vTPM is there (frozen here); \
             check the guest there before anything else",
            a.host
        ),
        other => {
            relay::take_back(&plan)?;
            bail!("xl migrate failed ({other:?}); {} and its vTPM stay here", a.domain)
        }
    }
}
