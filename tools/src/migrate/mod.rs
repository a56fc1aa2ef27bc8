//! Live migration of a guest with its vTPM: `xvtpm migrate DOMAIN HOST` runs `xl migrate` with
//! our relay as its transport (`relay`), which hands the vTPM to `xvtpm migrate-accept` at
//! the destination (`accept`) between the guest's suspend and its resume there (`wire`: the
//! channel). libxl has no hook for a vtpm device's state, so the wrapper is needed: plain `xl
//! migrate` would start the guest at the destination without its vTPM. A PV guest's vTPM is
//! named on the command line; an HVM guest's is found in xvtpmd's state root (it is keyed by
//! the domain's uuid).

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
    /// A PV guest's vTPM: its uuid at the manager (`vtpm serve --vtpm-uuid`).
    #[arg(long, requires_all = ["state_dir", "token_file"])]
    pub vtpm_uuid: Option<String>,
    /// A PV guest's vTPM: its state directory here (`vtpm serve --state-dir`).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// A PV guest's vTPM: its token file here (`vtpm serve --token-file`).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// xvtpmd's state root here (its `state-root`), where an HVM guest's vTPM is.
    #[arg(long, value_name = "DIR", default_value = crate::daemon_layout::DEFAULT_STATE_ROOT)]
    pub vtpms: PathBuf,
    /// xvtpmd's status file here: an HVM guest's vTPM is removed once xvtpmd no longer serves it.
    #[arg(long, value_name = "FILE", default_value = crate::daemon_status::DEFAULT_PATH)]
    pub status_file: PathBuf,
    /// The vtpm's snapshot directory here (`vtpm serve --snapshot-dir`).
    #[arg(long, value_name = "DIR", default_value = xvtpm_vtpm::snapshot::DEFAULT_DIR)]
    pub snapshot_dir: PathBuf,
    /// A PV guest's vTPM is a TPM 1.2 (an HVM guest's says so itself).
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

/// The guest's vTPM, as xenstore names it.
enum GuestTpm {
    /// A PV guest's first vtpm device: its uuid.
    Pv(String),
    /// An HVM guest's TPM (xvtpmd's): the vTPM's uuid, the domain's.
    Hvm(String),
}

/// Domain `name`'s vTPM: its HVM TPM request (dom0's xvtpmd serves it), or its first vtpm
/// device.
fn guest_tpm(xen: &XenOpts, name: &str) -> anyhow::Result<GuestTpm> {
    use xvtpm_xen::xenbus::{hvm_request_path, HVM_UUID_KEY};
    let xs = xen.open()?.xenstore()?;
    let tx = xvtpm_xen::TxId::NONE;
    for d in xs.directory(tx, "/local/domain")? {
        let Ok(id) = d.parse::<u16>() else { continue };
        if xs.try_read(tx, &format!("/local/domain/{id}/name"))?.as_deref() != Some(name.as_bytes()) {
            continue;
        }
        let req = format!("{}/{HVM_UUID_KEY}", hvm_request_path(id));
        if let Some(raw) = xs.try_read(tx, &req)? {
            return Ok(GuestTpm::Hvm(xvtpm_xen::xenbus::parse_uuid(&req, &raw)?));
        }
        let devices = xs.directory(tx, &format!("/local/domain/0/backend/vtpm/{id}")).unwrap_or_default();
        let Some(h) = devices.first() else {
            bail!("domain {name} ({id}) has neither a vtpm device served from dom0 nor an HVM guest's TPM")
        };
        let uuid = xs.try_read(tx, &format!("/local/domain/0/backend/vtpm/{id}/{h}/uuid"))?;
        return Ok(GuestTpm::Pv(String::from_utf8_lossy(&uuid.context("the device has no uuid")?).into_owned()));
    }
    bail!("no domain named {name}")
}

/// What moves: the vTPM's uuids, where it is here, its TPM version.
struct Source {
    device_uuid: String,
    vtpm_uuid: String,
    state_dir: PathBuf,
    token_file: PathBuf,
    snapshot_dir: PathBuf,
    tpm12: bool,
    /// An HVM guest's vTPM directory in xvtpmd's root (removed here once it moved).
    hvm_dir: Option<PathBuf>,
}

fn source(a: &MigrateArgs) -> anyhow::Result<Source> {
    use crate::daemon_layout::{STATE, TOKEN, VERSION};
    match guest_tpm(&a.xen, &a.domain)? {
        GuestTpm::Hvm(uuid) => {
            if a.vtpm_uuid.is_some() {
                bail!(
                    "{} is an HVM guest: its vTPM is xvtpmd's ({}/{uuid}); leave out --vtpm-uuid, --state-dir and --token-file",
                    a.domain,
                    a.vtpms.display()
                );
            }
            let dir = a.vtpms.join(&uuid);
            let version = dir.join(VERSION);
            let tpm12 = match std::fs::read_to_string(&version).as_deref().map(str::trim) {
                Ok("1.2") => true,
                Ok("2.0") => false,
                _ => bail!(
                    "{} does not say the vTPM's TPM version (xvtpmd serves a vTPM without it as its `tpm-version` \
                     setting says): write 1.2 or 2.0 into it",
                    version.display()
                ),
            };
            Ok(Source {
                device_uuid: uuid.clone(),
                vtpm_uuid: uuid.clone(),
                state_dir: dir.join(STATE),
                token_file: dir.join(TOKEN),
                snapshot_dir: a.snapshot_dir.join(&uuid),
                tpm12,
                hvm_dir: Some(dir),
            })
        }
        GuestTpm::Pv(device_uuid) => {
            let (Some(vtpm_uuid), Some(state_dir), Some(token_file)) = (&a.vtpm_uuid, &a.state_dir, &a.token_file)
            else {
                bail!("{} is a PV guest: name its vTPM with --vtpm-uuid, --state-dir and --token-file", a.domain);
            };
            Ok(Source {
                device_uuid,
                vtpm_uuid: vtpm_uuid.clone(),
                state_dir: state_dir.clone(),
                token_file: token_file.clone(),
                snapshot_dir: a.snapshot_dir.clone(),
                tpm12: a.tpm12,
                hvm_dir: None,
            })
        }
    }
}

/// Waits (up to 30 s) until xvtpmd's status no longer lists vTPM `uuid`: its vtpm has
/// stopped. `false` if it still does.
fn xvtpmd_let_go(status: &std::path::Path, uuid: &str) -> bool {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let listed = crate::daemon_status::read(status).map(|all| all.iter().any(|s| s.uuid == uuid)).unwrap_or(false);
        if !listed {
            return true;
        }
        if std::time::Instant::now() > end {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Runs `xvtpm migrate`.
pub fn migrate(a: MigrateArgs) -> anyhow::Result<()> {
    let src = source(&a)?;
    let device_uuid = src.device_uuid.clone();
    let to = xvtpm_vtpmmgr::hex(&crate::admin::migration_key_arg(&a.to)?);
    let state_dir = std::fs::canonicalize(&src.state_dir).with_context(|| format!("{}", src.state_dir.display()))?;
    let snapshots = xvtpm_vtpm::snapshot::SnapshotFile::for_state_dir(&src.snapshot_dir, &state_dir)?.paths().clone();
    let run = PathBuf::from("/run/xvtpm");
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&run)?;
    let base = run.join(format!("migrate-{}", std::process::id()));
    let plan = relay::Plan {
        via: a.via.clone(),
        admin_socket: a.admin_socket.clone(),
        to,
        device_uuid: device_uuid.clone(),
        vtpm_uuid: src.vtpm_uuid.clone(),
        tpm12: src.tpm12,
        hvm: src.hvm_dir.is_some(),
        state_dir,
        token_file: src.token_file.clone(),
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
    let uuid = crate::admin::uuid_arg(&src.vtpm_uuid)?;
    match status {
        Ok(s) if s.success() => {
            // The guest and its vTPM run at the destination: this manager lets the vTPM go.
            Admin::connect(&a.admin_socket)?.delete(&uuid)?;
            if let Some(dir) = &src.hvm_dir {
                // Its key is gone: what is left here is of no use. xvtpmd stops its vtpm when
                // the guest's domain goes, which writes a last snapshot: removed after that.
                if !xvtpmd_let_go(&a.status_file, &src.vtpm_uuid) {
                    log::warn!("xvtpmd still lists vTPM {}; removing its files anyway", src.vtpm_uuid);
                }
                for d in [dir, &src.snapshot_dir] {
                    if let Some(hidden) = accept::tombstone(d) {
                        if let Err(e) = std::fs::remove_dir_all(&hidden) {
                            log::warn!("cannot remove {}: {e}", hidden.display());
                        }
                    }
                }
                outln!("{} moved to {} with its vTPM {}", a.domain, a.host, src.vtpm_uuid);
            } else {
                for p in &snapshots {
                    let _ = std::fs::remove_file(p);
                }
                outln!("{} moved to {} with its vTPM {}; stop its vtpm here", a.domain, a.host, src.vtpm_uuid);
            }
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
