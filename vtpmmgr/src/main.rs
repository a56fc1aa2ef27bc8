//! `vtpmmgr`: the vTPM manager daemon and its admin commands.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use xvtpm_backend::{Backend, BackendConfig, DeviceFilter};
use xvtpm_tis::{devmem::DevMem, devtpm::DevTpm, swtpm::Address, swtpm::Swtpm, Family, HwTpm, SystemClock, Tis};
use xvtpm_vtpmmgr::manager::{InitConfig, Manager};
use xvtpm_vtpmmgr::proto::{self, status};
use xvtpm_vtpmmgr::server::{self, Client, XenHandler};
use xvtpm_vtpmmgr::store::dev::FileDev;
use xvtpm_vtpmmgr::uuid_str;
use xvtpm_xen::linux::LinuxXen;
use xvtpm_xen::platform::Xen;
use xvtpm_xen::sim::SimXen;

#[derive(Parser)]
#[command(
    name = "vtpmmgr",
    version,
    about = "The vTPM manager: keeps every vTPM's state key in a store that only this machine's hardware TPM, with the PCR values it was sealed to, can open",
    long_about = "The vTPM manager keeps every vTPM's state hash and key in an encrypted, authenticated, \
crash-safe store (a file or block device). The store's root key is sealed by the hardware TPM to \
chosen PCRs, and a hardware NV counter bound into every update detects an old copy of the store.\n\n\
The hardware TPM (TPM 2.0 or 1.2; on a TPM 1.2 the manager takes ownership with the well-known \
owner and SRK secret if the TPM has no owner) (--tpm) is one of:\n  mmio                  the TPM's registers through /dev/mem (a domain owning the TPM with iomem=)\n  \
tpmrm:/dev/tpmrm0     the kernel's resource manager (dom0 deployments)\n  swtpm:DATA,CTRL       swtpm's Unix data and control sockets (tests)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new store: a fresh root key sealed to --pcrs, and a new NV counter.
    Init {
        /// The store (a file, created; or a block device).
        #[arg(long)]
        store: PathBuf,
        /// The hardware TPM.
        #[arg(long)]
        tpm: String,
        /// PCRs the root key is sealed to (comma separated).
        #[arg(long, default_value = "0,1,2,3,4,5,6,7", value_delimiter = ',')]
        pcrs: Vec<u8>,
        /// NV index of the anti-rollback counter (owner range).
        #[arg(long, default_value = "0x0181584d", value_parser = parse_hex)]
        nv_index: u32,
        /// Locality of the manager's TPM commands.
        #[arg(long, default_value_t = 0)]
        locality: u8,
    },
    /// Open the store (the TPM unseals its key) and serve vTPMs.
    Serve {
        /// The store.
        #[arg(long)]
        store: PathBuf,
        /// The hardware TPM.
        #[arg(long)]
        tpm: String,
        /// Unix socket for vTPM processes (dom0 deployments); each must BIND with its token.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Unix socket for management commands (mode 0600).
        #[arg(long)]
        admin_socket: Option<PathBuf>,
        /// Serve vTPM domains over Xen's tpmback (identity: the device's uuid in xenstore).
        #[arg(long)]
        xen: bool,
        /// With --xen: the simulated Xen in this directory instead of /dev/xen.
        #[arg(long, requires = "domid")]
        sim: Option<PathBuf>,
        /// With --xen: this domain's id.
        #[arg(long)]
        domid: Option<u16>,
        /// Provision unknown vTPMs that save (into group 0) instead of refusing them.
        #[arg(long)]
        auto_provision: bool,
    },
    /// Management commands through a running manager's admin socket.
    Admin {
        /// The admin socket.
        #[arg(long)]
        socket: PathBuf,
        #[command(subcommand)]
        what: AdminCmd,
    },
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Provision a vTPM; prints its uuid.
    Provision {
        /// Its uuid (default: a new random one).
        #[arg(long)]
        uuid: Option<String>,
        /// Its group.
        #[arg(long, default_value_t = 0)]
        group: u32,
        /// A file of 32 bytes: the token its vtpm process presents on the vTPM socket.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// List a group's vTPMs.
    List {
        /// The group.
        #[arg(long, default_value_t = 0)]
        group: u32,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Delete a vTPM and its key.
    Delete {
        /// Its uuid.
        uuid: String,
    },
    /// Create a group; prints its number and uuid.
    GroupNew,
    /// List the groups (number, uuid, vTPMs).
    GroupList {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Delete an empty group.
    GroupDelete {
        /// Its number.
        group: u32,
    },
}

fn parse_hex(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0x"), 16).map_err(|e| e.to_string())
}

fn open_tpm(spec: &str) -> anyhow::Result<Box<dyn HwTpm + Send>> {
    Ok(match spec.split_once(':') {
        _ if spec == "mmio" => Box::new(Tis::probe(DevMem::open_tpm()?, SystemClock::new())?),
        Some(("tpmrm", path)) => Box::new(DevTpm::open(Path::new(path))?),
        Some(("swtpm", rest)) => {
            let (data, ctrl) = rest.split_once(',').context("swtpm:DATA_SOCKET,CTRL_SOCKET")?;
            let mut t = Swtpm::connect(&Address::Unix(data.into()), &Address::Unix(ctrl.into()), Family::Tpm20)?;
            t.detect_family()?;
            Box::new(t)
        }
        _ => bail!("unknown --tpm {spec:?} (mmio, tpmrm:PATH or swtpm:DATA,CTRL)"),
    })
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match Cli::parse().cmd {
        Cmd::Init { store, tpm, pcrs, nv_index, locality } => {
            let tpm = open_tpm(&tpm)?;
            let m = Manager::init(FileDev::open(&store, true)?, tpm, &InitConfig { pcrs, nv_index, locality })?;
            println!("store {} created ({} hardware TPM commands)", store.display(), m.tpm_commands);
        }
        Cmd::Serve { store, tpm, socket, admin_socket, xen, sim, domid, auto_provision } => {
            if socket.is_none() && admin_socket.is_none() && !xen {
                bail!("nothing to serve: give --socket, --admin-socket or --xen");
            }
            let mut m = Manager::open(FileDev::open(&store, false)?, open_tpm(&tpm)?)
                .with_context(|| format!("opening the store {}", store.display()))?;
            m.auto_provision = auto_provision;
            log::info!("manager ready ({} hardware TPM commands to open the store)", m.tpm_commands);
            let mgr = Arc::new(Mutex::new(m));
            let mut threads = Vec::new();
            if let Some(p) = &socket {
                threads.push(server::serve_unix(mgr.clone(), p, false)?);
            }
            if let Some(p) = &admin_socket {
                threads.push(server::serve_unix(mgr.clone(), p, true)?);
            }
            if xen {
                let x: Arc<dyn Xen> = match (sim, domid) {
                    (Some(dir), Some(d)) => Arc::new(SimXen::new(dir, d)),
                    (None, Some(d)) => Arc::new(LinuxXen::with_domid(d)),
                    _ => Arc::new(LinuxXen::open().context("cannot reach Xen (is this a Xen domain?)")?),
                };
                let handler = Arc::new(XenHandler::new(mgr.clone()));
                Backend::new(x, handler, BackendConfig { filter: DeviceFilter::All }).run(&AtomicBool::new(false))?;
            }
            for t in threads {
                let _ = t.join();
            }
        }
        Cmd::Admin { socket, what } => admin(&socket, what)?,
    }
    Ok(())
}

fn admin(socket: &Path, what: AdminCmd) -> anyhow::Result<()> {
    let mut c = Client::connect(socket)?;
    let check = |st: u32| -> anyhow::Result<()> {
        match st {
            status::SUCCESS => Ok(()),
            status::BAD_PARAMETER => bail!("refused: unknown vTPM or bad request (see the manager's log)"),
            st => bail!("the manager answered status {st} (see its log)"),
        }
    };
    match what {
        AdminCmd::Provision { uuid, group, token_file } => {
            let mut body = group.to_be_bytes().to_vec();
            if let Some(u) = uuid {
                body.extend_from_slice(&proto::parse_uuid(&u).context("malformed uuid")?);
            } else if token_file.is_some() {
                body.extend_from_slice(&rand_uuid());
            }
            if let Some(f) = token_file {
                let t = std::fs::read(&f).with_context(|| format!("read {}", f.display()))?;
                if t.len() != 32 {
                    bail!("{}: a token is 32 bytes", f.display());
                }
                body.extend_from_slice(&t);
            }
            let (st, out) = c.call(proto::TAG_REQ2, proto::VTPM_NEW, &body)?;
            check(st)?;
            let u: [u8; 16] = out.as_slice().try_into().context("short reply")?;
            println!("{}", uuid_str(&u));
        }
        AdminCmd::List { group, json } => {
            let (st, out) =
                c.call(proto::TAG_REQ2, proto::VTPM_LIST, &[group.to_be_bytes(), 0u32.to_be_bytes()].concat())?;
            check(st)?;
            let uuids: Vec<String> = out
                .get(4..)
                .unwrap_or_default()
                .chunks_exact(16)
                .map(|u| uuid_str(u.try_into().unwrap_or(&[0; 16])))
                .collect();
            if json {
                let items: Vec<String> =
                    uuids.iter().map(|u| format!("{{\"uuid\":\"{u}\",\"group\":{group}}}")).collect();
                println!("[{}]", items.join(","));
            } else {
                for u in uuids {
                    println!("{u}");
                }
            }
        }
        AdminCmd::GroupNew => {
            let (st, out) = c.call(proto::TAG_REQ2, proto::GROUP_NEW, &[])?;
            check(st)?;
            let n = u32::from_be_bytes(out.get(..4).and_then(|b| b.try_into().ok()).context("short reply")?);
            let u: [u8; 16] = out.get(4..20).and_then(|b| b.try_into().ok()).context("short reply")?;
            println!("{n} {}", uuid_str(&u));
        }
        AdminCmd::GroupList { json } => {
            let (st, out) = c.call(proto::TAG_REQ2, proto::GROUP_LIST, &[])?;
            check(st)?;
            let mut rows = Vec::new();
            for n in out.get(4..).unwrap_or_default().chunks_exact(4) {
                let (st, g) = c.call(proto::TAG_REQ2, proto::GROUP_SHOW, n)?;
                check(st)?;
                let u: [u8; 16] = g.get(..16).and_then(|b| b.try_into().ok()).context("short reply")?;
                let count = u32::from_be_bytes(g.get(16..20).and_then(|b| b.try_into().ok()).context("short reply")?);
                rows.push((u32::from_be_bytes([n[0], n[1], n[2], n[3]]), uuid_str(&u), count));
            }
            if json {
                let items: Vec<String> =
                    rows.iter().map(|(n, u, c)| format!("{{\"group\":{n},\"uuid\":\"{u}\",\"vtpms\":{c}}}")).collect();
                println!("[{}]", items.join(","));
            } else {
                for (n, u, c) in rows {
                    println!("{n} {u} {c}");
                }
            }
        }
        AdminCmd::GroupDelete { group } => {
            let (st, _) = c.call(proto::TAG_REQ2, proto::GROUP_DEL, &group.to_be_bytes())?;
            check(st)?;
        }
        AdminCmd::Delete { uuid } => {
            let (st, _) =
                c.call(proto::TAG_REQ2, proto::VTPM_DEL, &proto::parse_uuid(&uuid).context("malformed uuid")?)?;
            check(st)?;
        }
    }
    Ok(())
}

fn rand_uuid() -> [u8; 16] {
    let mut u: [u8; 16] = rand::random();
    u[6] = (u[6] & 0x0F) | 0x40;
    u[8] = (u[8] & 0x3F) | 0x80;
    u
}
