//! The manager's management commands: vTPMs and groups, through its admin socket or, for a
//! manager in its own domain, a vtpm device to it.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::json;
use xvtpm_vtpmmgr::admin::Admin;
use xvtpm_vtpmmgr::{hex, uuid_str};

use crate::xenadmin::XenAdminLink;
use crate::XenOpts;

/// Where the manager listens for management commands.
#[derive(Args, Debug)]
pub struct AdminOpts {
    /// The manager's admin socket (`vtpmmgr serve --admin-socket`).
    #[arg(long, value_name = "PATH", default_value = "/run/xvtpm/admin.sock")]
    admin_socket: PathBuf,
    /// Reach a manager in its own domain (name or id) instead, over a vtpm device this tool
    /// makes for the command and removes after it (the manager must serve `--xen
    /// --admin-domain` with this domain's id, 0 for dom0).
    #[arg(long, value_name = "DOMAIN", conflicts_with = "admin_socket")]
    manager_domain: Option<String>,
    #[command(flatten)]
    xen: XenOpts,
    /// Print data as JSON.
    #[arg(long)]
    json: bool,
}

impl AdminOpts {
    fn connect(&self) -> anyhow::Result<Admin> {
        if let Some(d) = &self.manager_domain {
            let xen = self.xen.open()?;
            let link = XenAdminLink::open(xen.as_ref(), d)?;
            return Ok(Admin::over(Box::new(link)));
        }
        let p = &self.admin_socket;
        Admin::connect(p).with_context(|| format!("cannot reach the manager's admin socket {}", p.display()))
    }
}

/// vTPM commands.
#[derive(Subcommand, Debug)]
pub enum VtpmCmd {
    /// Provision a vTPM at the manager; prints its uuid (the `uuid=` of its domain's vtpm line).
    Provision {
        #[command(flatten)]
        opts: AdminOpts,
        /// Its uuid (default: a new random one).
        #[arg(long)]
        uuid: Option<String>,
        /// Its group.
        #[arg(long, default_value_t = 0)]
        group: u32,
        /// A 32-byte file: the token its vtpm process presents on the manager's vTPM socket
        /// (dom0 deployments). vTPM domains on Xen need none.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// List a group's vTPMs.
    List {
        #[command(flatten)]
        opts: AdminOpts,
        /// The group.
        #[arg(long, default_value_t = 0)]
        group: u32,
    },
    /// Show one vTPM: its group and whether it has saved a state key.
    Show {
        #[command(flatten)]
        opts: AdminOpts,
        /// Its uuid.
        uuid: String,
    },
    /// Print this manager's migration key (its identity: where bundles are encrypted to, and
    /// what signs the bundles it exports): what `export` at a source manager takes to move a
    /// vTPM here, and what `trust-source` at a destination pins to accept bundles from here.
    MigrationKey {
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// Pin a source manager's migration key: this manager imports bundles signed by it (and
    /// by no other). Compare the key with `xvtpm vtpm migration-key` at the source out of band.
    TrustSource {
        #[command(flatten)]
        opts: AdminOpts,
        /// The source's migration key: the hex digits, or a file holding them.
        #[arg(value_name = "KEY|FILE")]
        key: String,
    },
    /// Unpin a source manager: its bundles are refused from now on.
    DistrustSource {
        #[command(flatten)]
        opts: AdminOpts,
        /// The source's migration key: the hex digits, or a file holding them.
        #[arg(value_name = "KEY|FILE")]
        key: String,
    },
    /// Print the public part of the key that signs this manager's deep quotes (hex; TPM 2.0:
    /// a TPMT_PUBLIC, TPM 1.2: a TPM_PUBKEY), for a verifier to register. Only this manager
    /// can make or use that key: it comes from the store's root key.
    AttestationKey {
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// Export a vTPM to another manager: writes a bundle (its state's key, encrypted to that
    /// manager's migration key) and freezes the vTPM here until it is deleted or imported
    /// back. Copy the vTPM's state (its disk or state directory) with the bundle: it is
    /// encrypted under the key the bundle carries.
    Export {
        #[command(flatten)]
        opts: AdminOpts,
        /// Its uuid.
        uuid: String,
        /// The destination manager's migration key (`xvtpm vtpm migration-key` there): the
        /// hex digits, or a file holding them.
        #[arg(long, value_name = "KEY|FILE")]
        to: String,
        /// The bundle to write (never overwritten).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Export a vTPM exported already to a different manager: only when the first bundle
        /// is lost for good (else two managers could each run the vTPM).
        #[arg(long)]
        force: bool,
    },
    /// Import a bundle that `export` made for this manager; prints the vTPM's uuid.
    Import {
        #[command(flatten)]
        opts: AdminOpts,
        /// The bundle.
        bundle: PathBuf,
        /// The group to put it in.
        #[arg(long, default_value_t = 0)]
        group: u32,
    },
    /// Delete a vTPM and its key at the manager (its state becomes unreadable).
    Delete {
        #[command(flatten)]
        opts: AdminOpts,
        /// Its uuid.
        uuid: String,
    },
    /// Bind a vTPM to the uid its vtpm process runs as (a socket vTPM is bound to the uid of
    /// its first BIND; this sets another, e.g. after moving the vtpm to its own user), or with
    /// --clear let its next BIND record one. Other uids are refused its key.
    BindUid {
        #[command(flatten)]
        opts: AdminOpts,
        /// Its uuid.
        uuid: String,
        /// The uid.
        #[arg(long, required_unless_present = "clear", conflicts_with = "clear")]
        uid: Option<u32>,
        /// Clear the binding instead.
        #[arg(long)]
        clear: bool,
    },
}

/// Group commands.
#[derive(Subcommand, Debug)]
pub enum GroupCmd {
    /// Create a group; prints its number and uuid.
    New {
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// List the groups with their number of vTPMs.
    List {
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// Delete an empty group.
    Delete {
        #[command(flatten)]
        opts: AdminOpts,
        /// Its number.
        group: u32,
    },
    /// Approve a boot hash for the group's vTPMs. Once a group has approvals, its vTPMs must
    /// run with one of them: the manager refuses their keys and quotes otherwise.
    Approve {
        #[command(flatten)]
        opts: AdminOpts,
        /// The group's number.
        group: u32,
        #[command(flatten)]
        what: MeasureArgs,
    },
    /// Withdraw an approval (with none left, the group's vTPMs may run with any boot hash).
    Revoke {
        #[command(flatten)]
        opts: AdminOpts,
        /// The group's number.
        group: u32,
        #[command(flatten)]
        what: MeasureArgs,
    },
    /// List the boot hashes approved for a group.
    Approved {
        #[command(flatten)]
        opts: AdminOpts,
        /// The group's number.
        group: u32,
    },
}

/// A boot hash: given, or measured from the vtpm executable (dom0 vTPM processes) or from a
/// vTPM domain's kernel, ramdisk and command line (vTPM domains), as the manager measures them.
#[derive(Args, Debug)]
pub struct MeasureArgs {
    /// The boot hash (64 hex digits).
    #[arg(conflicts_with_all = ["exe", "kernel"], required_unless_present_any = ["exe", "kernel"])]
    pub hash: Option<String>,
    /// Measure this executable (what a vTPM process connecting over the Unix socket runs).
    #[arg(long, conflicts_with = "kernel")]
    pub exe: Option<PathBuf>,
    /// Measure a vTPM domain built from this kernel...
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// ...this ramdisk...
    #[arg(long, requires = "kernel")]
    pub ramdisk: Option<PathBuf>,
    /// ...and this command line (as in its domain file's `cmdline`/`extra`).
    #[arg(long, requires = "kernel", default_value = "")]
    pub cmdline: String,
}

impl MeasureArgs {
    /// The boot hash these arguments name.
    pub fn boot_hash(&self) -> anyhow::Result<[u8; 32]> {
        use xvtpm_vtpmmgr::peer;
        if let Some(h) = &self.hash {
            let bytes = unhex(h).unwrap_or_default();
            return bytes.try_into().map_err(|_| anyhow::anyhow!("a boot hash is 64 hex digits, not {h:?}"));
        }
        if let Some(exe) = &self.exe {
            return peer::measure(&[exe.as_path()], &[]).with_context(|| format!("measure {}", exe.display()));
        }
        let kernel = self.kernel.as_deref().context("give a hash, --exe or --kernel")?;
        peer::measure_domain_image(kernel, self.ramdisk.as_deref(), &self.cmdline)
            .with_context(|| format!("measure the domain image {}", kernel.display()))
    }
}

/// Hex digits as bytes (`None`: not hex, or an odd count).
fn unhex(t: &str) -> Option<Vec<u8>> {
    (0..t.len()).step_by(2).map(|i| t.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect()
}

/// A migration key given as hex digits, or as a file holding them.
pub(crate) fn migration_key_arg(s: &str) -> anyhow::Result<Vec<u8>> {
    let text = match std::path::Path::new(s).is_file() {
        true => std::fs::read_to_string(s).with_context(|| format!("read {s}"))?,
        false => s.to_string(),
    };
    match unhex(text.trim()) {
        Some(b) if b.len() == xvtpm_vtpmmgr::migrate::PUBLIC_LEN => Ok(b),
        _ => bail!(
            "a migration key is {} hex digits (`xvtpm vtpm migration-key` at the destination)",
            2 * xvtpm_vtpmmgr::migrate::PUBLIC_LEN
        ),
    }
}

/// Writes a new file readable by its owner only; never overwrites.
fn write_new(path: &std::path::Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(data).and_then(|()| f.sync_all()).with_context(|| format!("write {}", path.display()))
}

pub(crate) fn uuid_arg(s: &str) -> anyhow::Result<[u8; 16]> {
    Ok(xvtpm_proto::Uuid::parse(s)?.0)
}

/// Runs a vTPM command.
pub fn vtpm(cmd: VtpmCmd) -> anyhow::Result<()> {
    match cmd {
        VtpmCmd::Provision { opts, uuid, group, token_file } => {
            let uuid = uuid.as_deref().map(uuid_arg).transpose()?;
            let token = match &token_file {
                Some(f) => {
                    let t = std::fs::read(f).with_context(|| format!("read {}", f.display()))?;
                    let t: [u8; 32] =
                        t.try_into().map_err(|_| anyhow::anyhow!("{}: a token is 32 bytes", f.display()))?;
                    Some(t)
                }
                None => None,
            };
            let u = opts.connect()?.provision(uuid, group, token.as_ref())?;
            match opts.json {
                true => outln!("{}", json!({"uuid": uuid_str(&u), "group": group})),
                false => outln!("{}", uuid_str(&u)),
            }
        }
        VtpmCmd::List { opts, group } => {
            let list = opts.connect()?.list(group)?;
            match opts.json {
                true => {
                    let items: Vec<_> = list.iter().map(|u| json!({"uuid": uuid_str(u), "group": group})).collect();
                    outln!("{}", json!(items));
                }
                false => list.iter().for_each(|u| outln!("{}", uuid_str(u))),
            }
        }
        VtpmCmd::Show { opts, uuid } => {
            let v = opts.connect()?.show(&uuid_arg(&uuid)?)?;
            match opts.json {
                true => outln!(
                    "{}",
                    json!({"uuid": uuid_str(&v.uuid), "group": v.group, "has_key": v.has_key, "exported": v.exported})
                ),
                false => outln!(
                    "uuid {}\ngroup {}\nstate key saved {}\nexported (frozen here) {}",
                    uuid_str(&v.uuid),
                    v.group,
                    if v.has_key { "yes" } else { "no" },
                    if v.exported { "yes" } else { "no" }
                ),
            }
        }
        VtpmCmd::MigrationKey { opts } => {
            let k = hex(&opts.connect()?.migration_key()?);
            match opts.json {
                true => outln!("{}", json!({ "migration_key": k })),
                false => outln!("{k}"),
            }
        }
        VtpmCmd::AttestationKey { opts } => {
            let k = hex(&opts.connect()?.attestation_key()?);
            match opts.json {
                true => outln!("{}", json!({ "attestation_key": k })),
                false => outln!("{k}"),
            }
        }
        VtpmCmd::TrustSource { opts, key } => {
            let new = opts.connect()?.trust_source(&migration_key_arg(&key)?)?;
            match opts.json {
                true => outln!("{}", json!({ "pinned": true, "new": new })),
                false => outln!("{}", if new { "pinned" } else { "pinned already" }),
            }
        }
        VtpmCmd::DistrustSource { opts, key } => {
            let was = opts.connect()?.distrust_source(&migration_key_arg(&key)?)?;
            match opts.json {
                true => outln!("{}", json!({ "unpinned": was })),
                false => outln!("{}", if was { "unpinned" } else { "was not pinned" }),
            }
        }
        VtpmCmd::Export { opts, uuid, to, out, force } => {
            let u = uuid_arg(&uuid)?;
            let key = migration_key_arg(&to)?;
            // Refuse before the manager freezes the vTPM, not after.
            if out.exists() {
                bail!("{} exists; not overwritten", out.display());
            }
            let bundle = opts.connect()?.export(&u, &key, force)?;
            write_new(&out, &bundle)?;
            match opts.json {
                true => outln!("{}", json!({"uuid": uuid_str(&u), "bundle": out.display().to_string()})),
                false => outln!("vTPM {} exported to {} (frozen at this manager)", uuid_str(&u), out.display()),
            }
        }
        VtpmCmd::Import { opts, bundle, group } => {
            let b = std::fs::read(&bundle).with_context(|| format!("read {}", bundle.display()))?;
            let u = opts.connect()?.import(&b, group)?;
            match opts.json {
                true => outln!("{}", json!({"uuid": uuid_str(&u), "group": group})),
                false => outln!("{}", uuid_str(&u)),
            }
        }
        VtpmCmd::Delete { opts, uuid } => opts.connect()?.delete(&uuid_arg(&uuid)?)?,
        VtpmCmd::BindUid { opts, uuid, uid, clear: _ } => opts.connect()?.set_uid(&uuid_arg(&uuid)?, uid)?,
    }
    Ok(())
}

/// Runs a group command.
pub fn group(cmd: GroupCmd) -> anyhow::Result<()> {
    match cmd {
        GroupCmd::New { opts } => {
            let g = opts.connect()?.group_new()?;
            match opts.json {
                true => outln!("{}", json!({"group": g.number, "uuid": uuid_str(&g.uuid)})),
                false => outln!("{} {}", g.number, uuid_str(&g.uuid)),
            }
        }
        GroupCmd::List { opts } => {
            let gs = opts.connect()?.groups()?;
            if opts.json {
                let items: Vec<_> = gs
                    .iter()
                    .map(|g| json!({"group": g.number, "uuid": uuid_str(&g.uuid), "vtpms": g.vtpms}))
                    .collect();
                outln!("{}", json!(items));
            } else {
                for g in gs {
                    outln!("{} {} {} vTPMs", g.number, uuid_str(&g.uuid), g.vtpms);
                }
            }
        }
        GroupCmd::Delete { opts, group } => {
            if group == 0 {
                bail!("group 0 always exists");
            }
            opts.connect()?.group_delete(group)?;
        }
        GroupCmd::Approve { opts, group, what } => {
            let h = what.boot_hash()?;
            let added = opts.connect()?.approve(group, &h)?;
            outln!("{} {}", hex(&h), if added { "approved" } else { "was approved already" });
        }
        GroupCmd::Revoke { opts, group, what } => {
            let h = what.boot_hash()?;
            let removed = opts.connect()?.revoke(group, &h)?;
            outln!("{} {}", hex(&h), if removed { "revoked" } else { "was not approved" });
        }
        GroupCmd::Approved { opts, group } => {
            let hs = opts.connect()?.approved(group)?;
            match opts.json {
                true => {
                    let items: Vec<String> = hs.iter().map(|h| format!("\"{}\"", hex(h))).collect();
                    outln!("[{}]", items.join(","));
                }
                false if hs.is_empty() => outln!("none: the group's vTPMs may run with any boot hash"),
                false => hs.iter().for_each(|h| outln!("{}", hex(h))),
            }
        }
    }
    Ok(())
}
