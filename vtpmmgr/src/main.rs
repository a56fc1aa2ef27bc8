//! `vtpmmgr`: the vTPM manager daemon and its admin commands.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use xvtpm_backend::{Backend, BackendConfig, DeviceFilter};
use xvtpm_tis::{devmem::DevMem, devtpm::DevTpm, swtpm::Address, swtpm::Swtpm, Family, HwTpm, SystemClock, Tis};
use xvtpm_vtpmmgr::manager::{InitConfig, Manager};
use xvtpm_vtpmmgr::pace::{self, Rate};
use xvtpm_vtpmmgr::server::{self, XenHandler};
use xvtpm_vtpmmgr::store::dev::FileDev;
use xvtpm_xen::platform::Xen;

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
        /// A file holding the TPM's owner auth, if its owner set one (read at init only). TPM
        /// 2.0: the storage primary key is then kept at --srk-handle, so that serving needs no
        /// owner auth. TPM 1.2: an unowned TPM is taken with it (its SHA-1 unless 20 bytes).
        #[arg(long, value_name = "FILE")]
        owner_auth_file: Option<PathBuf>,
        /// TPM 2.0: a file holding an owner auth to set at the end of init (the current one
        /// from --owner-auth-file, else empty), so that only its holder can undefine the
        /// counter. Every other user of the owner hierarchy then needs it too.
        #[arg(long, value_name = "FILE")]
        set_owner_auth_file: Option<PathBuf>,
        /// TPM 2.0: keep the storage primary key at this persistent handle (0x81000001 when an
        /// owner auth is given or set).
        #[arg(long, value_parser = parse_hex)]
        srk_handle: Option<u32>,
    },
    /// Open the store (the TPM unseals its key) and serve vTPMs.
    Serve {
        #[command(flatten)]
        opened: Opened,
        /// Unix socket for vTPM processes (dom0 deployments); each must BIND with its token.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Unix socket for management commands (mode 0600; the `xvtpm` tool uses it).
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
        /// With --xen: take management commands (only those) on vtpm devices whose frontend is
        /// this domain: the operator's `xvtpm --manager-domain` in dom0 (0) reaches a manager
        /// in its own domain this way.
        #[arg(long, requires = "xen")]
        admin_domain: Option<u16>,
        /// Provision unknown vTPMs that save (into group 0) instead of refusing them.
        #[arg(long)]
        auto_provision: bool,
        /// The group (name or number) of the vTPM socket (mode 0660): the sandboxed vtpms'
        /// (xvtpmd's `sandbox-group`). Default: the manager's own group.
        #[arg(long, value_name = "GROUP", requires = "socket")]
        socket_group: Option<String>,
        /// Most clients connected at once, per socket (each dom0 vTPM keeps one connection).
        #[arg(long, default_value_t = 1024)]
        max_clients: usize,
        /// GET_QUOTEs a vTPM may ask for back to back...
        #[arg(long, default_value_t = 4)]
        quote_burst: u32,
        /// ...then one per this many milliseconds (0: no limit).
        #[arg(long, default_value_t = 1000)]
        quote_interval_ms: u64,
        /// State saves (SAVEHASHKEY) a vTPM may make back to back...
        #[arg(long, default_value_t = pace::SAVE_RATE.burst)]
        save_burst: u32,
        /// ...then one per this many milliseconds (0: no limit). A vTPM over its rate is told
        /// to retry, and waits; the manager's disk and the hardware are not touched.
        #[arg(long, default_value_t = pace::SAVE_RATE.interval.as_millis() as u64)]
        save_interval_ms: u64,
        /// vTPM state saves share one hardware counter increment per this many seconds (0:
        /// one increment per save). Someone who can rewrite the store's file can bring back
        /// saves of the last two windows, never older ones; management updates increment at
        /// once (docs/dom0.md, "Hardware NV writes").
        #[arg(long, default_value_t = pace::COUNTER_WINDOW.as_secs())]
        counter_window_secs: u64,
    },
    /// After the manager refused its store over the hardware counter: accept the TPM's
    /// counter value (defining the counter again if it is gone) and rewrite the store's roots.
    /// Stop the manager first. Read the warning it prints: an old copy of the store loses
    /// every update made after it.
    Recover {
        #[command(flatten)]
        opened: Opened,
        /// A file holding the TPM's owner auth, if its owner set one (needed to define the
        /// counter again).
        #[arg(long, value_name = "FILE")]
        owner_auth_file: Option<PathBuf>,
    },
    /// Writes this tool's man pages and shell completions under DIR (for packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// Where `man1/` and `completions/` go.
        dir: PathBuf,
    },
}

/// A secret's bytes from a file (a final newline dropped), or none.
fn secret_file(path: Option<&Path>) -> anyhow::Result<Vec<u8>> {
    let Some(p) = path else { return Ok(Vec::new()) };
    let mut b = std::fs::read(p).with_context(|| format!("read {}", p.display()))?;
    if b.last() == Some(&b'\n') {
        b.pop();
    }
    if b.is_empty() || b.len() > 32 {
        bail!("{}: an owner auth has 1 to 32 bytes, this file {}", p.display(), b.len());
    }
    Ok(b)
}

/// An existing store, its hardware TPM, and what the store must be sealed to.
#[derive(Args)]
struct Opened {
    /// The store.
    #[arg(long)]
    store: PathBuf,
    /// The hardware TPM.
    #[arg(long)]
    tpm: String,
    /// PCRs the store must be sealed to (as given to `init`).
    #[arg(long, default_value = "0,1,2,3,4,5,6,7", value_delimiter = ',')]
    pcrs: Vec<u8>,
    /// Locality the store must be sealed at (as given to `init`).
    #[arg(long, default_value_t = 0)]
    locality: u8,
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
        Cmd::Init { store, tpm, pcrs, nv_index, locality, owner_auth_file, set_owner_auth_file, srk_handle } => {
            let cfg = InitConfig {
                pcrs,
                nv_index,
                locality,
                owner_auth: secret_file(owner_auth_file.as_deref())?,
                new_owner_auth: set_owner_auth_file.as_deref().map(|p| secret_file(Some(p))).transpose()?,
                srk_handle,
            };
            let tpm = open_tpm(&tpm)?;
            let m = Manager::init(FileDev::open(&store, true)?, tpm, &cfg)?;
            println!("store {} created ({} hardware TPM commands)", store.display(), m.tpm_commands);
        }
        Cmd::Recover { opened: Opened { store, tpm, pcrs, locality }, owner_auth_file } => {
            let owner = secret_file(owner_auth_file.as_deref())?;
            let r = Manager::recover(FileDev::open(&store, false)?, open_tpm(&tpm)?, Some((&pcrs, locality)), &owner)
                .with_context(|| format!("recovering the store {}", store.display()))?;
            if !r.rebased {
                println!(
                    "store {}: in step with the hardware counter ({}, the store at {}); nothing changed",
                    store.display(),
                    r.hw_counter,
                    r.store_counter
                );
            } else {
                println!(
                    "store {}: recovered. Its roots now carry the hardware counter's value {} (they carried {}{}); \
                     {} vTPMs, every block verified. If this store was an old copy, updates made after it are lost.",
                    store.display(),
                    r.hw_counter,
                    r.store_counter,
                    if r.redefined { "; the counter was defined again" } else { "" },
                    r.vtpms
                );
            }
        }
        Cmd::Serve {
            opened: Opened { store, tpm, pcrs, locality },
            socket,
            admin_socket,
            xen,
            sim,
            domid,
            admin_domain,
            auto_provision,
            socket_group,
            max_clients,
            quote_burst,
            quote_interval_ms,
            save_burst,
            save_interval_ms,
            counter_window_secs,
        } => {
            if socket.is_none() && admin_socket.is_none() && !xen {
                bail!("nothing to serve: give --socket, --admin-socket or --xen");
            }
            let socket_group = match socket_group.as_deref() {
                Some(g) => Some(xvtpm_cli::users::group_id(g).with_context(|| format!("no group {g:?}"))?),
                None => None,
            };
            let mut m = Manager::open_expecting(FileDev::open(&store, false)?, open_tpm(&tpm)?, &pcrs, locality)
                .with_context(|| format!("opening the store {}", store.display()))?;
            m.auto_provision = auto_provision;
            m.quotes.rate = Rate { burst: quote_burst, interval: Duration::from_millis(quote_interval_ms) };
            m.saves.rate = Rate { burst: save_burst, interval: Duration::from_millis(save_interval_ms) };
            m.set_counter_window(Duration::from_secs(counter_window_secs));
            log::info!("manager ready ({} hardware TPM commands to open the store)", m.tpm_commands);
            let mgr = Arc::new(Mutex::new(m));
            let mut threads = vec![server::spawn_counter_flusher(mgr.clone())?];
            if let Some(p) = &socket {
                threads.push(server::serve_unix_group(mgr.clone(), p, max_clients, socket_group)?);
            }
            if let Some(p) = &admin_socket {
                threads.push(server::serve_unix(mgr.clone(), p, true, max_clients)?);
            }
            // The sockets listen: units ordered after this one (xvtpmd) may connect.
            if let Err(e) = xvtpm_cli::notify::ready("the store is open; serving") {
                log::warn!("cannot tell systemd that the manager is ready: {e}");
            }
            if xen {
                let x: Arc<dyn Xen> =
                    xvtpm_xen::open(sim.as_deref(), domid).context("cannot reach Xen (is this a Xen domain?)")?;
                let xs = x.xenstore().context("xenstore")?;
                let measure = move |domid| xvtpm_vtpmmgr::peer::measure_domain(&xs, domid);
                let mut handler = XenHandler::new(mgr.clone()).measuring(Box::new(measure));
                if let Some(d) = admin_domain {
                    log::info!("management commands from domain {d}'s vtpm devices");
                    handler = handler.admin_from(d);
                }
                let handler = Arc::new(handler);
                Backend::new(x, handler, BackendConfig::serving(DeviceFilter::All))
                    .run(&xvtpm_backend::StopSignal::default())?;
            }
            for t in threads {
                let _ = t.join();
            }
        }
        Cmd::GenerateDocs { dir } => xvtpm_cli::docs::generate(<Cli as clap::CommandFactory>::command(), &dir)?,
    }
    Ok(())
}
