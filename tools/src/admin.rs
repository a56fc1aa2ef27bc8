//! The manager's management commands: vTPMs and groups, through its admin socket.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use xvtpm_vtpmmgr::admin::Admin;
use xvtpm_vtpmmgr::proto::parse_uuid;
use xvtpm_vtpmmgr::uuid_str;

/// Where the manager listens for management commands.
#[derive(Args, Debug)]
pub struct AdminOpts {
    /// The manager's admin socket (`vtpmmgr serve --admin-socket`).
    #[arg(long, value_name = "PATH", default_value = "/run/xvtpm/admin.sock")]
    admin_socket: PathBuf,
    /// Print data as JSON.
    #[arg(long)]
    json: bool,
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
    /// Delete a vTPM and its key at the manager (its state becomes unreadable).
    Delete {
        #[command(flatten)]
        opts: AdminOpts,
        /// Its uuid.
        uuid: String,
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
}

fn uuid_arg(s: &str) -> anyhow::Result<[u8; 16]> {
    parse_uuid(s).with_context(|| format!("malformed uuid {s:?} (expected 8-4-4-4-12 hex digits)"))
}

fn connect(p: &Path) -> anyhow::Result<Admin> {
    Admin::connect(p).with_context(|| format!("cannot reach the manager's admin socket {}", p.display()))
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
            let u = connect(&opts.admin_socket)?.provision(uuid, group, token.as_ref())?;
            match opts.json {
                true => println!("{{\"uuid\":\"{}\",\"group\":{group}}}", uuid_str(&u)),
                false => println!("{}", uuid_str(&u)),
            }
        }
        VtpmCmd::List { opts, group } => {
            let list = connect(&opts.admin_socket)?.list(group)?;
            match opts.json {
                true => {
                    let items: Vec<String> =
                        list.iter().map(|u| format!("{{\"uuid\":\"{}\",\"group\":{group}}}", uuid_str(u))).collect();
                    println!("[{}]", items.join(","));
                }
                false => list.iter().for_each(|u| println!("{}", uuid_str(u))),
            }
        }
        VtpmCmd::Show { opts, uuid } => {
            let v = connect(&opts.admin_socket)?.show(&uuid_arg(&uuid)?)?;
            match opts.json {
                true => {
                    println!("{{\"uuid\":\"{}\",\"group\":{},\"has_key\":{}}}", uuid_str(&v.uuid), v.group, v.has_key)
                }
                false => println!(
                    "uuid {}\ngroup {}\nstate key saved {}",
                    uuid_str(&v.uuid),
                    v.group,
                    if v.has_key { "yes" } else { "no" }
                ),
            }
        }
        VtpmCmd::Delete { opts, uuid } => connect(&opts.admin_socket)?.delete(&uuid_arg(&uuid)?)?,
    }
    Ok(())
}

/// Runs a group command.
pub fn group(cmd: GroupCmd) -> anyhow::Result<()> {
    match cmd {
        GroupCmd::New { opts } => {
            let g = connect(&opts.admin_socket)?.group_new()?;
            match opts.json {
                true => println!("{{\"group\":{},\"uuid\":\"{}\"}}", g.number, uuid_str(&g.uuid)),
                false => println!("{} {}", g.number, uuid_str(&g.uuid)),
            }
        }
        GroupCmd::List { opts } => {
            let gs = connect(&opts.admin_socket)?.groups()?;
            if opts.json {
                let items: Vec<String> = gs
                    .iter()
                    .map(|g| {
                        format!("{{\"group\":{},\"uuid\":\"{}\",\"vtpms\":{}}}", g.number, uuid_str(&g.uuid), g.vtpms)
                    })
                    .collect();
                println!("[{}]", items.join(","));
            } else {
                for g in gs {
                    println!("{} {} {} vTPMs", g.number, uuid_str(&g.uuid), g.vtpms);
                }
            }
        }
        GroupCmd::Delete { opts, group } => {
            if group == 0 {
                bail!("group 0 always exists");
            }
            connect(&opts.admin_socket)?.group_delete(group)?;
        }
    }
    Ok(())
}
