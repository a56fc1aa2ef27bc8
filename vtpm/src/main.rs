//! `vtpm`: one guest's virtual TPM.
//!
//! `vtpm create` makes a new vTPM state; `vtpm serve` serves a Xen guest's vtpm device through
//! tpmback; `vtpm socket` speaks swtpm's socket protocol with swtpm's options. The drop-in for
//! swtpm itself is the separate, smaller `xvtpm-swtpm`.

#![forbid(unsafe_code)]

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use xvtpm_backend::{Backend, BackendConfig, DeviceFilter};
use xvtpm_vtpm::libtpms::{Libtpms, LibtpmsConfig};
use xvtpm_vtpm::proxy_info::ProxyInfo;
use xvtpm_vtpm::snapshot::SnapshotFile;
use xvtpm_vtpm::state::file::{FileStore, KeyFormat, StateKey};
use xvtpm_vtpm::state::link::{UnixLink, XenLink};
use xvtpm_vtpm::state::managed::{ManagedStore, ManagerLink};
use xvtpm_vtpm::state::StateStore;
use xvtpm_vtpm::sys::sandbox::{Sandbox, Visible};
use xvtpm_vtpm::tpmif::{HandlerConfig, VtpmHandler};
use xvtpm_vtpm::{TpmEngine, TpmVersion};
use xvtpm_xen::Xen;

#[derive(Parser, Debug)]
#[command(
    name = "vtpm",
    version,
    about = "One guest's virtual TPM (TPM 2.0 by default, 1.2 on request) with encrypted, crash-safe state",
    long_about = "One guest's virtual TPM (TPM 2.0 by default, 1.2 on request) with encrypted, \
        authenticated, crash-safe state.\n\nTypical use on a Xen host: `vtpm create --state-dir \
        /var/lib/xvtpm/<uuid> --key <keyfile>` once, then `vtpm serve --state-dir ... --key ... \
        --uuid <uuid>` before `xl create` of a guest whose domain file has \
        vtpm=[\"backend=0,uuid=<uuid>\"].\n\nFor tools written against swtpm, install `xvtpm-swtpm` as \
        `swtpm`: it takes swtpm's command line unchanged."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct StateOpts {
    /// Directory holding this vTPM's state (one directory per vTPM).
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// File with the 256-bit state encryption key. Without it the state is only
    /// integrity-checked, not encrypted.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// How the key file is written.
    #[arg(long, value_enum, default_value_t = KeyFmt::Binary)]
    key_format: KeyFmt,
    /// Emulate a TPM 1.2 instead of a TPM 2.0.
    #[arg(long = "tpm1.2")]
    tpm12: bool,
    /// Keep the state key at the vTPM manager instead of a key file: `unix:PATH` (the
    /// manager's vTPM socket; give --vtpm-uuid and --token-file) or `xen:HANDLE` (our vtpm
    /// device HANDLE, whose backend is the manager's domain). Every save then uses a fresh key.
    #[arg(long, value_name = "unix:PATH|xen:HANDLE", conflicts_with = "key")]
    manager: Option<String>,
    /// With --manager unix:PATH: this vTPM's uuid, as provisioned at the manager.
    #[arg(long)]
    vtpm_uuid: Option<String>,
    /// With --manager unix:PATH: the file holding this vTPM's 32-byte token.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// The token, read before the sandbox hides its file.
    #[arg(skip)]
    token: Option<Vec<u8>>,
    /// Use the simulated Xen in this directory instead of /dev/xen and xenstored.
    #[arg(long, value_name = "DIR", requires = "domid")]
    sim: Option<PathBuf>,
    /// Our domain id (default: from xenstore).
    #[arg(long)]
    domid: Option<u16>,
}

/// `vtpm serve`'s sandbox (xvtpmd gives every vtpm one).
#[derive(Args, Debug, Clone)]
struct SandboxOpts {
    /// Serve from a sandbox, as this user id: no capabilities, a root holding only the state
    /// directory, the snapshot directory and the directory of the manager's socket, resource
    /// limits and a system-call filter (a forbidden call kills the process). Entered once
    /// Xen's devices are open and the token read, before the state is read and the manager
    /// reached (as this uid) and before the guest's first byte. Needs root to start; a key
    /// file is refused (keep the key at the manager).
    /// privcmd and xenstore stay outside, in a helper process that answers only about this
    /// guest's domain and relays only this device's xenstore requests; with --frontend the
    /// event channel handle binds to that domain only. Needs --domid.
    // (Not with `serve --incoming` either: checked where both exist.)
    #[arg(long, value_name = "UID", requires_all = ["sandbox_gid", "domid"], conflicts_with = "sim")]
    sandbox_uid: Option<u32>,
    /// The sandbox's group id.
    #[arg(long, value_name = "GID", requires = "sandbox_uid")]
    sandbox_gid: Option<u32>,
    /// The sandbox's supplementary groups (comma-separated), e.g. the group of the manager's
    /// socket.
    #[arg(long, value_name = "GID,...", value_delimiter = ',', requires = "sandbox_uid")]
    sandbox_groups: Vec<u32>,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum KeyFmt {
    Binary,
    Hex,
}

impl StateOpts {
    fn version(&self) -> TpmVersion {
        if self.tpm12 {
            TpmVersion::V1_2
        } else {
            TpmVersion::V2_0
        }
    }

    fn xen(&self) -> anyhow::Result<Arc<dyn Xen>> {
        xvtpm_xen::open(self.sim.as_deref(), self.domid).context("cannot reach Xen (is this a Xen domain?)")
    }

    fn store(&self) -> anyhow::Result<Box<dyn StateStore>> {
        let Some(m) = &self.manager else { return Ok(Box::new(self.file_store()?)) };
        let link: Box<dyn ManagerLink> = match m.split_once(':') {
            Some(("unix", path)) => {
                let u = self.vtpm_uuid.as_deref().context("--manager unix:PATH needs --vtpm-uuid")?;
                let uuid = uuid_bytes(u).with_context(|| format!("malformed uuid {u:?}"))?;
                let token = match &self.token {
                    Some(t) => t.clone(),
                    None => self.read_token()?,
                };
                Box::new(UnixLink::connect(Path::new(path), &uuid, &token)?)
            }
            Some(("xen", handle)) => {
                let handle: u32 = handle.parse().context("xen:HANDLE")?;
                Box::new(XenLink::connect(self.xen()?.as_ref(), handle)?)
            }
            _ => bail!("--manager: unix:PATH or xen:HANDLE"),
        };
        Ok(Box::new(ManagedStore::open(&self.state_dir, link)?))
    }

    fn read_token(&self) -> anyhow::Result<Vec<u8>> {
        let tf = self.token_file.as_ref().context("--manager unix:PATH needs --token-file")?;
        std::fs::read(tf).with_context(|| format!("read {}", tf.display()))
    }

    fn file_store(&self) -> anyhow::Result<FileStore> {
        let key = match &self.key {
            Some(path) => {
                let format = match self.key_format {
                    KeyFmt::Binary => KeyFormat::Binary,
                    KeyFmt::Hex => KeyFormat::Hex,
                };
                Some(StateKey::from_file(path, format)?)
            }
            None => None,
        };
        Ok(FileStore::open(&self.state_dir, key)?)
    }

    fn engine(&self, create: bool) -> anyhow::Result<Libtpms> {
        let store = self.store()?;
        Ok(Libtpms::new(LibtpmsConfig { version: self.version(), store, create, label: self.state_dir.clone() })?)
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new vTPM: manufacture a TPM and store its state. Refuses to overwrite one.
    Create {
        #[command(flatten)]
        state: StateOpts,
    },
    /// Serve one Xen guest's vtpm device through tpmback, until killed. The device is chosen
    /// by its uuid (the `uuid=` of the guest's `vtpm=` line) or by frontend domain and handle.
    Serve {
        #[command(flatten)]
        state: StateOpts,
        /// Serve the device with this uuid.
        #[arg(long, conflicts_with = "frontend")]
        uuid: Option<String>,
        /// Serve the device of this frontend (guest) domain id...
        #[arg(long, requires = "handle")]
        frontend: Option<u16>,
        /// ...with this device handle.
        #[arg(long)]
        handle: Option<u32>,
        /// The highest locality the guest may claim (0-3; 0 by default: a Xen guest has no
        /// DRTM, so a higher claim is only its kernel's word, and Linux's tpmfront sends 0).
        #[arg(long, default_value_t = xvtpm_vtpm::tpmif::DEFAULT_MAX_LOCALITY, value_parser = clap::value_parser!(u8).range(0..=3))]
        max_locality: u8,
        /// Where the TPM's volatile state (PCRs, sessions, loaded objects) is kept after every
        /// command, encrypted like the state, so that a restart under a running guest resumes
        /// its TPM. Memory-backed storage is enough: it only has to outlive this process. With
        /// `none`, a restart under a running guest refuses that guest.
        #[arg(long, value_name = "DIR|none", default_value = xvtpm_vtpm::snapshot::DEFAULT_DIR)]
        snapshot_dir: PathBuf,
        /// Accept a reset TPM for this running guest (domain id) if its TPM cannot be resumed
        /// (no snapshot, or a damaged one): its PCRs start over under it. Without this the
        /// guest gets the TPM's failure response until it reboots.
        #[arg(long, value_name = "DOMID")]
        reset_running_guest: Option<u16>,
        /// In a domain of its own (a vTPM stub domain), which may not read its guest's `vm`
        /// path: how long a connection waits for dom0's `xvtpmd` to write the guest's life
        /// into the device's directory. Without it the guest's TPM is never matched to a
        /// snapshot: it starts reset.
        #[arg(long, value_name = "SECONDS", default_value_t = 0)]
        guest_life_wait_secs: u64,
        /// The state is not here yet: a live migration brings it (state directory files, the
        /// key at this host's manager, the snapshot). Serve the device at once, and open the
        /// state when the guest first connects.
        #[arg(long)]
        incoming: bool,
        #[command(flatten)]
        sandbox: SandboxOpts,
    },
    /// Serve an HVM guest's TPM: the TPM's registers at 0xFED40000 (the FIFO interface: PTP
    /// for a TPM 2.0, TIS 1.3 for a 1.2), emulated in this process through an ioreq server of
    /// Xen's, beside the guest's device model. Start it after the domain is built and before
    /// it runs (xvtpmd does, asked by the `xvtpm-qemu-dm` wrapper that the domain file names as
    /// its device_model_override). The first start for a domain is its platform's: the TPM
    /// starts reset, and the guest's firmware or kernel sends the start-up. A start for a
    /// domain already served (a restart) takes over the registers and refuses the guest (the
    /// TPM's failure response to every command) until it reboots: never reset PCRs under it.
    ServeHvm {
        #[command(flatten)]
        state: StateOpts,
        /// The guest's domain id.
        #[arg(long, value_name = "DOMID")]
        guest: u16,
        /// The request directory in xenstore (xvtpmd's): the ioreq server's id and `ready`
        /// are written there, and a restart takes over the server named there. The server is
        /// then left registered at exit, so that the guest waits for the next vtpm.
        #[arg(long, value_name = "PATH")]
        request: Option<String>,
        /// Written (empty) once the registers are served (for use without xvtpmd).
        #[arg(long, value_name = "FILE")]
        ready_file: Option<PathBuf>,
        /// Where the TPM's volatile state is kept after every command (as `serve` keeps it),
        /// so that a restart under the running guest, or its restore after `xl save`,
        /// continues its TPM. With `none`, both are refused until the guest reboots.
        #[arg(long, value_name = "DIR|none", default_value = xvtpm_vtpm::snapshot::DEFAULT_DIR)]
        snapshot_dir: PathBuf,
        #[command(flatten)]
        sandbox: SandboxOpts,
    },
    /// Serve the TPM over swtpm's socket protocol (data and control channels), taking swtpm's
    /// own options, e.g. `vtpm socket --tpm2 --server type=tcp,port=2321 --ctrl
    /// type=tcp,port=2322 --tpmstate dir=D --key file=K,format=binary,mode=aes-256-cbc --flags
    /// not-need-init,startup-clear`. The state must exist (`vtpm create`); `xvtpm-swtpm`,
    /// the drop-in for swtpm, creates a missing state as swtpm does.
    Socket {
        /// swtpm's socket-mode options.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "SWTPM OPTIONS")]
        args: Vec<String>,
    },
    /// Serve a container's TPM through Linux's vTPM proxy: make a /dev/tpmN (and, for TPM 2.0,
    /// /dev/tpmrmN) with /dev/vtpmx (module tpm_vtpm_proxy) and answer its commands until
    /// SIGTERM/SIGINT, which removes the device; SIGUSR1 cancels the command in progress.
    /// Prints the device (number, major/minor of both nodes) as one JSON line once the kernel
    /// has registered it, so a container manager can create the node inside the container.
    /// The state must exist (`vtpm create`).
    Proxy {
        #[command(flatten)]
        state: StateOpts,
        /// The proxy's control device.
        #[arg(long, value_name = "PATH", default_value = "/dev/vtpmx")]
        vtpmx: PathBuf,
        /// Also write the JSON line to this file (replaced atomically; removed at exit).
        #[arg(long, value_name = "FILE")]
        info_file: Option<PathBuf>,
    },
    /// Writes this tool's man pages and shell completions under DIR (for packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// Where `man1/` and `completions/` go.
        dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    xvtpm_vtpm::sys::malloc::one_arena();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Create { state } => create(&state),
        Command::Serve {
            state,
            uuid,
            frontend,
            handle,
            max_locality,
            snapshot_dir,
            reset_running_guest,
            guest_life_wait_secs,
            incoming,
            sandbox,
        } => {
            let filter = match (uuid, frontend, handle) {
                (Some(u), _, _) => DeviceFilter::Uuid(u.to_ascii_lowercase()),
                (None, Some(f), Some(h)) => DeviceFilter::Device { frontend: f, handle: h },
                _ => bail!("choose the device: --uuid U, or --frontend DOMID --handle N"),
            };
            if incoming && sandbox.sandbox_uid.is_some() {
                bail!("--incoming and --sandbox-uid: a migration's vtpm runs unsandboxed");
            }
            let mut state = state;
            let sandbox = sandbox.prepare(&mut state, &snapshot_dir)?;
            let xen: Arc<dyn Xen> = match &sandbox {
                Some(sb) => {
                    // `--domid` is required with the sandbox: looking it up would start a thread.
                    let domid = state.domid.context("--sandbox-uid needs --domid")?;
                    // Only about its guest (any guest with --uuid) and its own domain.
                    let allowed = frontend.map(|f| vec![f, domid]);
                    // Forked now, while this process has one thread.
                    // Its xenstore requests go through the helper too, limited to its device.
                    let policy = xvtpm_xen::xenstore::guard::Policy::new(domid, frontend, handle);
                    let (helper, xs) =
                        xvtpm_xen::linux::helper::DomainHelper::spawn(allowed, Some(policy), &|| sb.confine_helper())
                            .context("cannot start the domain helper")?;
                    // Held open: the sandbox has no /dev/xen, and no right to open it.
                    Arc::new(
                        xvtpm_xen::linux::HeldXen::open(domid, frontend, helper, xs)
                            .context("cannot open Xen's devices")?,
                    )
                }
                None => state.xen()?,
            };
            let config = ServeConfig {
                filter,
                max_locality,
                snapshot_dir,
                reset_running_guest,
                guest_life_wait: std::time::Duration::from_secs(guest_life_wait_secs),
                incoming,
                sandbox,
            };
            serve(&state, xen, config)
        }
        Command::ServeHvm { state, guest, request, ready_file, snapshot_dir, sandbox } => {
            if sandbox.sandbox_uid.is_some() && request.is_none() {
                // Alone, it follows its domain through xenstore and privcmd, which a sandbox
                // has not; under xvtpmd (--request) xvtpmd does that.
                bail!("--sandbox-uid needs --request: a sandboxed serve-hvm is xvtpmd's");
            }
            let mut state = state;
            let sandbox = sandbox.prepare(&mut state, &snapshot_dir)?;
            let hvm = HvmConfig { guest, request, ready_file, snapshot_dir, sandbox };
            serve_hvm(&state, hvm)
        }
        Command::Socket { args } => {
            let mut full = vec!["socket".to_string()];
            full.extend(args);
            // The state must exist: `vtpm create` makes it.
            Ok(xvtpm_vtpm::swtpm::launch::run(&full, false)?)
        }
        Command::Proxy { state, vtpmx, info_file } => proxy(&state, &vtpmx, info_file.as_deref()),
        Command::GenerateDocs { dir } => Ok(xvtpm_cli::docs::generate(<Cli as clap::CommandFactory>::command(), &dir)?),
    }
}

fn create(state: &StateOpts) -> anyhow::Result<()> {
    // One store for the check and the engine: it holds the directory's lock.
    let mut store = state.store()?;
    let v2 = xvtpm_vtpm::libtpms::blob_name_for(TpmVersion::V2_0, "permall");
    let v12 = xvtpm_vtpm::libtpms::blob_name_for(TpmVersion::V1_2, "permall");
    if store.load(&v2)?.is_some() || store.load(&v12)?.is_some() {
        bail!("{} already holds a vTPM; remove it first to create a new one", state.state_dir.display());
    }
    let mut engine =
        Libtpms::new(LibtpmsConfig { version: state.version(), store, create: true, label: state.state_dir.clone() })?;
    engine.init(false)?;
    engine.shutdown();
    drop(engine);
    let at = if state.manager.is_some() { " (key at the manager)" } else { "" };
    println!("created a {:?} vTPM in {}{at}", state.version(), state.state_dir.display());
    Ok(())
}

/// What `vtpm serve` was asked for, besides the state.
struct ServeConfig {
    filter: DeviceFilter,
    max_locality: u8,
    snapshot_dir: PathBuf,
    reset_running_guest: Option<u16>,
    guest_life_wait: std::time::Duration,
    incoming: bool,
    sandbox: Option<Sandbox>,
}

impl SandboxOpts {
    /// The sandbox asked for, with its private mount namespace made now: while the process
    /// still has one thread, so that every thread it starts shares it.
    /// The token is read now: the sandbox will not show its file.
    fn prepare(&self, state: &mut StateOpts, snapshot_dir: &Path) -> anyhow::Result<Option<Sandbox>> {
        let (Some(uid), Some(gid)) = (self.sandbox_uid, self.sandbox_gid) else { return Ok(None) };
        if state.manager.as_deref().is_some_and(|m| m.starts_with("unix:")) {
            state.token = Some(state.read_token()?);
        }
        if state.key.is_some() {
            bail!("--sandbox-uid with a key file: keep the key at the manager (--manager), which the sandbox reaches");
        }
        let mut visible = vec![Visible { path: state.state_dir.clone(), writable: true }];
        if snapshot_dir.as_os_str() != "none" {
            // Made here (it is the sandbox's to write in), so it can be shown.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(snapshot_dir)
                .with_context(|| format!("create {}", snapshot_dir.display()))?;
            // Given to the sandbox's uid whole: only this vTPM's snapshots may be in it.
            let own = SnapshotFile::for_state_dir(snapshot_dir, &state.state_dir)?;
            let names: Vec<_> = own.paths().iter().filter_map(|p| p.file_name()).collect();
            let entries =
                std::fs::read_dir(snapshot_dir).with_context(|| format!("read {}", snapshot_dir.display()))?;
            for entry in entries {
                let name = entry?.file_name();
                if !names.contains(&name.as_os_str()) {
                    bail!(
                        "{} holds {name:?}, which is not this vTPM's: a sandboxed vtpm needs a snapshot directory of its own (xvtpmd gives each <snapshot-dir>/<uuid>)",
                        snapshot_dir.display()
                    );
                }
            }
            visible.push(Visible { path: snapshot_dir.to_path_buf(), writable: true });
        }
        if let Some(path) = state.manager.as_deref().and_then(|m| m.strip_prefix("unix:")) {
            // The vtpm reconnects by path after the manager restarts: its directory, read-only.
            let dir = Path::new(path).parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("/"));
            visible.push(Visible { path: dir.to_path_buf(), writable: false });
        }
        xvtpm_vtpm::sys::sandbox::unshare().context("cannot prepare the sandbox")?;
        Ok(Some(Sandbox { uid, gid, groups: self.sandbox_groups.clone(), visible }))
    }
}

fn serve(state: &StateOpts, xen: Arc<dyn Xen>, config: ServeConfig) -> anyhow::Result<()> {
    let stop = Arc::new(xvtpm_backend::StopSignal::default());
    let s = stop.clone();
    xvtpm_vtpm::sys::signals::on_stop(move || s.set()).context("install the signal handlers")?;
    if let Some(sandbox) = &config.sandbox {
        // Before the state is opened: the vTPM's files are read, and the manager is reached
        // (its BIND checked against our uid), as the sandbox's user.
        sandbox.enter().context("cannot enter the sandbox")?;
        let shown: Vec<String> = sandbox.visible.iter().map(|v| v.path.display().to_string()).collect();
        log::info!("sandboxed: uid {}, gid {}, seeing only {}", sandbox.uid, sandbox.gid, shown.join(", "));
    }
    let engine = if config.incoming {
        // The directory exists from now on, for the migration to fill.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&state.state_dir)
            .with_context(|| format!("create {}", state.state_dir.display()))?;
        None
    } else {
        // Powered on now, so a bad state or key stops us before any guest is served.
        Some(power_on(state)?)
    };
    let snapshots = snapshots(&config.snapshot_dir, &state.state_dir)?;
    let handler_config = HandlerConfig {
        max_locality: config.max_locality,
        snapshots,
        reset_running_guest: config.reset_running_guest,
        guest_starts_tpm: false,
    };
    let handler = match engine {
        Some(engine) => {
            log::info!(
                "vTPM ({:?}) from {} ready; serving {:?}",
                engine.version(),
                state.state_dir.display(),
                config.filter
            );
            VtpmHandler::new(Box::new(engine), handler_config)
        }
        None => {
            log::info!(
                "vTPM ({:?}) incoming into {}: serving {:?}; its state is opened when the guest connects",
                state.version(),
                state.state_dir.display(),
                config.filter
            );
            let opts = state.clone();
            let loader: xvtpm_vtpm::tpmif::Loader = Box::new(move || {
                power_on(&opts).map(|e| Box::new(e) as Box<dyn TpmEngine>).map_err(|e| format!("{e:#}"))
            });
            VtpmHandler::incoming(state.version(), loader, xvtpm_vtpm::libtpms::canceller(), handler_config)
        }
    };
    let served = Backend::new(
        xen,
        handler.clone(),
        BackendConfig { filter: config.filter, guest_life_wait: config.guest_life_wait },
    )
    .run(&stop);
    // Stopped by a signal (or the backend failed): the guest's last state is kept either way.
    handler.stop();
    served?;
    Ok(())
}

/// What `vtpm serve-hvm` was asked for, besides the state.
struct HvmConfig {
    guest: u16,
    request: Option<String>,
    ready_file: Option<PathBuf>,
    snapshot_dir: PathBuf,
    sandbox: Option<Sandbox>,
}

fn serve_hvm(state: &StateOpts, hvm: HvmConfig) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use xvtpm_backend::{CancelProbe, CommandHandler, DeviceInfo, Request};
    use xvtpm_tis::mmio::{TPM_BASE, WINDOW_LEN};
    use xvtpm_vtpm::hvm::serve::TisServer;
    use xvtpm_vtpm::hvm::tis::{TisDevice, MAX_BUFFER};
    use xvtpm_xen::ioreq::IoreqServer;
    use xvtpm_xen::linux::ioreq::{DeviceModel, LinuxIoreqServer};
    use xvtpm_xen::xenbus::{HVM_ERROR_KEY, HVM_INCOMING_KEY, HVM_SERVER_KEY, HVM_STATE_KEY};
    use xvtpm_xen::{ShutdownReason, TxId};

    let guest = hvm.guest;
    let request = hvm.request.as_deref();
    let xen = xvtpm_xen::linux::LinuxXen::with_domid(0);
    let xs = xen.xenstore().context("cannot reach xenstore")?;
    let read = |key: &str| -> anyhow::Result<Option<String>> {
        let Some(dir) = request else { return Ok(None) };
        let v = xs.try_read(TxId::NONE, &format!("{dir}/{key}")).with_context(|| format!("read {dir}/{key}"))?;
        Ok(v.map(|v| String::from_utf8_lossy(&v).trim().to_string()))
    };
    // Served before (a restart under the running guest), or a saved guest restored: either
    // way the guest runs on, and its TPM is not a new platform's. `ready` stays once written
    // (a failed restart writes only `error`), so a vtpm restarted after one that failed (say,
    // its manager refused a vTPM frozen by a migration then called off) never boots the guest.
    let restart = read(HVM_STATE_KEY)?.as_deref() == Some("ready");
    let incoming = read(HVM_INCOMING_KEY)?.as_deref() == Some("1");
    let earlier: Option<u16> = read(HVM_SERVER_KEY)?.and_then(|v| v.parse().ok());
    let life = xvtpm_xen::toolstack::domain_life(&xs, guest)?;
    let uuid = life
        .as_deref()
        .and_then(xvtpm_xen::toolstack::uuid_of_vm)
        .with_context(|| format!("domain {guest} has no vm path naming its uuid"))?;
    let device = DeviceInfo { frontend: guest, handle: 0, uuid, life, adopted: restart || incoming };
    // Signals first: xvtpmd may tell a suspend as soon as the request says `ready`.
    let stop = Arc::new(AtomicBool::new(false));
    let serving: Arc<std::sync::OnceLock<Arc<LinuxIoreqServer>>> = Arc::default();
    let (st, sv) = (stop.clone(), serving.clone());
    xvtpm_vtpm::sys::signals::on_stop(move || {
        st.store(true, Ordering::SeqCst);
        if let Some(s) = sv.get() {
            s.interrupt();
        }
    })
    .context("install the signal handlers")?;
    // Told of the guest's suspend (`xl save`): by xvtpmd (SIGUSR2) under it, by Xen otherwise.
    // Installed now: the sandbox's filter forbids installing signal handlers.
    type Told = (Arc<VtpmHandler>, DeviceInfo);
    let told: Arc<std::sync::OnceLock<Told>> = Arc::default();
    let t = told.clone();
    xvtpm_vtpm::sys::signals::on_sigusr2(move || match t.get() {
        Some((h, d)) => h.domain_shut_down(d, ShutdownReason::Suspend),
        None => log::warn!("SIGUSR2 (the guest suspended) before the TPM was on: ignored"),
    })
    .context("install the SIGUSR2 handler")?;
    let dm = || DeviceModel::open(guest).context("cannot open the device model interface");
    let window = [(TPM_BASE, TPM_BASE + u64::from(WINDOW_LEN) - 1)];
    let server = match earlier {
        Some(id) => match LinuxIoreqServer::adopt(dm()?, id) {
            Ok(s) => s,
            Err(e) => {
                // Its ranges would overlap the new server's: gone first.
                log::warn!("domain {guest}: cannot take over ioreq server {id} ({e}); destroying it, making a new one");
                dm()?.destroy_ioreq_server(id);
                LinuxIoreqServer::create(dm()?, &window)?
            }
        },
        None => LinuxIoreqServer::create(dm()?, &window)
            .with_context(|| format!("cannot serve the TPM registers of domain {guest}"))?,
    };
    let server = Arc::new(server);
    let _ = serving.set(server.clone());
    if let Some(dir) = request {
        // Kept at exit from now on: the guest waits for the next vtpm, which takes it over.
        server.keep();
        xs.write(TxId::NONE, &format!("{dir}/{HVM_SERVER_KEY}"), server.id().to_string().as_bytes())?;
    }
    if let Some(sandbox) = &hvm.sandbox {
        // Xen's devices are open; the state is read, and the manager reached, as the
        // sandbox's user. The xenstore connection stays open until `ready` is written,
        // before the guest's first byte is read.
        sandbox.enter().context("cannot enter the sandbox")?;
        log::info!("sandboxed: uid {}, gid {}", sandbox.uid, sandbox.gid);
    }
    let engine = match power_on(state) {
        Ok(e) => e,
        Err(e) => {
            if let Some(dir) = request {
                // The wrapper prints it and the domain's creation fails (dom0's own tree). A
                // guest served before stays `ready`: the next vtpm resumes it, never boots it.
                let _ = xs.write(TxId::NONE, &format!("{dir}/{HVM_ERROR_KEY}"), format!("{e:#}").as_bytes());
                if !restart {
                    let _ = xs.write(TxId::NONE, &format!("{dir}/{HVM_STATE_KEY}"), b"refused");
                }
            }
            return Err(e);
        }
    };
    let version = engine.version();
    let snapshots = snapshots(&hvm.snapshot_dir, &state.state_dir)?;
    let config = HandlerConfig {
        max_locality: xvtpm_vtpm::tpmif::DEFAULT_MAX_LOCALITY,
        snapshots,
        reset_running_guest: None,
        guest_starts_tpm: true,
    };
    let handler = VtpmHandler::new(Box::new(engine), config);
    if device.adopted || request.is_none() {
        // The running guest: its TPM resumed from the snapshot, or the guest refused. Alone
        // (no request to say whether this domain was served before), the snapshot decides,
        // as for a PV guest: its own domain's is resumed, another life starts reset.
        handler.connected(&device);
    } else {
        // A boot: whatever a snapshot says, this platform starts reset.
        handler.new_platform(&device);
    }
    let _ = told.set((handler.clone(), device.clone()));
    if let Some(dir) = request {
        // Served, but refused (its TPM could not be resumed): said beside `ready`, so that a
        // migration does not count a refusing TPM as arrived.
        let refusal = handler.refusal();
        xs.transaction(|tx| {
            match &refusal {
                Some(why) => xs.write(tx, &format!("{dir}/{HVM_ERROR_KEY}"), why.as_bytes())?,
                None => xs.try_rm(tx, &format!("{dir}/{HVM_ERROR_KEY}"))?,
            }
            xs.write(tx, &format!("{dir}/{HVM_STATE_KEY}"), b"ready")
        })?;
    }
    if let Some(f) = &hvm.ready_file {
        std::fs::write(f, b"").with_context(|| format!("write {}", f.display()))?;
    }
    if request.is_none() {
        follow_domain(xen, xs, handler.clone(), device.clone(), stop.clone(), server.clone())?;
    } else {
        drop(xs);
    }
    let cancelled = Arc::new(AtomicBool::new(false));
    let probe = CancelProbe::from_flag(cancelled.clone());
    let (h, d, c) = (handler.clone(), device.clone(), cancelled.clone());
    let execute = Box::new(move |locality: u8, command: &[u8]| {
        c.store(false, Ordering::SeqCst);
        h.handle(&Request::new(&d, locality, command, MAX_BUFFER, &probe))
    });
    let mut tis = TisServer::new(
        TisDevice::new(version),
        execute,
        Arc::new(move || cancelled.store(true, Ordering::SeqCst)),
        Box::new(move |loc| log::info!("domain {guest}: reset of the establishment bit from locality {loc} ignored")),
    )
    .context("cannot start the TPM's thread")?;
    log::info!(
        "vTPM ({version:?}) from {}: serving domain {guest}'s TPM registers at {TPM_BASE:#x}",
        state.state_dir.display()
    );
    let served = tis.run(server.as_ref(), &stop);
    drop(tis);
    // The guest's last state into the snapshot, for the next vtpm.
    handler.stop();
    served.with_context(|| format!("serving domain {guest}"))?;
    log::info!("stopped; state kept in {}", state.state_dir.display());
    Ok(())
}

/// Without xvtpmd: follows the guest's domain through `@releaseDomain`, telling `handler` of
/// its suspend and stopping the serving loop once it is gone.
fn follow_domain(
    xen: xvtpm_xen::linux::LinuxXen,
    xs: xvtpm_xen::Xenstore,
    handler: Arc<VtpmHandler>,
    device: xvtpm_backend::DeviceInfo,
    stop: Arc<std::sync::atomic::AtomicBool>,
    server: Arc<xvtpm_xen::linux::ioreq::LinuxIoreqServer>,
) -> anyhow::Result<()> {
    use xvtpm_backend::CommandHandler;
    use xvtpm_xen::ioreq::IoreqServer;
    let guest = device.frontend;
    xs.watch("@releaseDomain", "xvtpm-hvm").context("watch @releaseDomain")?;
    std::thread::Builder::new().name("domain".into()).spawn(move || {
        let mut told = None;
        loop {
            if let Err(e) = xs.next_event(None) {
                log::warn!("xenstore: {e}");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            let info = match xen.domain_info(guest) {
                Ok(i) => i,
                Err(e) => {
                    log::warn!("cannot ask about domain {guest}: {e}");
                    continue;
                }
            };
            match info {
                Some(i) if !i.dying => {
                    if i.shutdown != told {
                        if let Some(reason) = i.shutdown {
                            handler.domain_shut_down(&device, reason);
                        }
                        told = i.shutdown;
                    }
                }
                _ => {
                    log::info!("domain {guest} is gone");
                    stop.store(true, std::sync::atomic::Ordering::SeqCst);
                    server.interrupt();
                    return;
                }
            }
        }
    })?;
    Ok(())
}

/// The snapshot file of the vTPM in `state_dir` under `dir` (`none`: no snapshots).
fn snapshots(dir: &Path, state_dir: &Path) -> anyhow::Result<Option<SnapshotFile>> {
    if dir.as_os_str() == "none" {
        log::warn!("no snapshots (--snapshot-dir none): a restart under a running guest will refuse that guest");
        return Ok(None);
    }
    let f = SnapshotFile::for_state_dir(dir, state_dir)?;
    log::info!("the TPM's volatile state is kept in {}", f.describe());
    Ok(Some(f))
}

/// Opens the state and powers the TPM on, not started: a new guest gets Startup, a running one
/// its snapshot. A volatile state left in the state directory (by swtpm's control channel) is
/// no guest's: dropped.
fn power_on(state: &StateOpts) -> anyhow::Result<Libtpms> {
    let mut engine = state.engine(false)?;
    engine.init(true).with_context(|| format!("cannot start the vTPM in {}", state_dir_label(&state.state_dir)))?;
    Ok(engine)
}

fn proxy(state: &StateOpts, vtpmx: &Path, info_file: Option<&Path>) -> anyhow::Result<()> {
    let wake = Arc::new(xvtpm_xen::wake::WakeFd::new()?);
    let w = wake.clone();
    let stop = xvtpm_vtpm::sys::signals::on_stop(move || w.wake()).context("install the signal handlers")?;
    let mut engine = state.engine(false)?;
    engine.init(false).with_context(|| format!("cannot start the vTPM in {}", state_dir_label(&state.state_dir)))?;
    // Started here, as at a platform reset: the kernel then finds a started TPM (its self
    // test passes) instead of logging a TPM error and sending the start-up itself.
    xvtpm_vtpm::engine::startup_clear(&mut engine)?;
    let version = engine.version();
    xvtpm_vtpm::sys::signals::cancel_on_sigusr1(engine.canceller()).context("install the SIGUSR1 handler")?;
    let dev = xvtpm_vtpm::sys::vtpmx::create(vtpmx, version)?;
    let n = dev.tpm_num;
    log::info!(
        "vTPM ({version:?}) from {}: kernel device tpm{n} ({}:{})",
        state.state_dir.display(),
        dev.major,
        dev.minor
    );
    let mut chan = dev.file;
    let w = wake.clone();
    let server = std::thread::spawn(move || {
        let end = xvtpm_vtpm::proxy::serve(&mut engine, &mut chan, stop, &w);
        // Closing the descriptor deletes the device before the engine powers off.
        drop(chan);
        engine.shutdown();
        end
    });
    // The kernel registers the device (and starts the TPM through us) in the background.
    let registered = wait_registered(n, version, &server);
    let info = match registered {
        Ok(rm) => ProxyInfo {
            tpm_num: n,
            version: if version == TpmVersion::V2_0 { "2.0" } else { "1.2" }.into(),
            device: format!("/dev/tpm{n}"),
            major: dev.major,
            minor: dev.minor,
            rm_device: rm.map(|_| format!("/dev/tpmrm{n}")),
            rm_major: rm.map(|(maj, _)| maj),
            rm_minor: rm.map(|(_, min)| min),
            pid: std::process::id(),
            state_dir: state.state_dir.display().to_string(),
        }
        .to_json(),
        Err(e) => {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            wake.wake();
            let _ = server.join();
            return Err(e);
        }
    };
    println!("{info}");
    if let Some(f) = info_file {
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, format!("{info}\n"))
            .and_then(|()| std::fs::rename(&tmp, f))
            .with_context(|| format!("write {}", f.display()))?;
    }
    log::info!("serving /dev/tpm{n}");
    let end = server.join().map_err(|_| anyhow::anyhow!("the serving thread panicked"));
    if let Some(f) = info_file {
        let _ = std::fs::remove_file(f);
    }
    match end?? {
        xvtpm_vtpm::proxy::ProxyEnd::Stopped => {
            log::info!("stopped; /dev/tpm{n} removed, state kept in {}", state.state_dir.display());
            Ok(())
        }
        xvtpm_vtpm::proxy::ProxyEnd::DeviceGone => bail!("the kernel removed /dev/tpm{n}"),
    }
}

/// Waits until the kernel has registered tpm`n`: the major and minor of tpmrm`n` for TPM 2.0.
fn wait_registered<T>(
    n: u32,
    version: TpmVersion,
    server: &std::thread::JoinHandle<T>,
) -> anyhow::Result<Option<(u32, u32)>> {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let dev = |p: String| -> Option<(u32, u32)> {
        let s = std::fs::read_to_string(p).ok()?;
        let (a, b) = s.trim().split_once(':')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    };
    loop {
        if dev(format!("/sys/class/tpm/tpm{n}/dev")).is_some() {
            match version {
                TpmVersion::V1_2 => return Ok(None),
                TpmVersion::V2_0 => {
                    if let Some(rm) = dev(format!("/sys/class/tpmrm/tpmrm{n}/dev")) {
                        return Ok(Some(rm));
                    }
                }
            }
        }
        if server.is_finished() {
            bail!("the kernel did not register tpm{n}: the device went away during registration (see the kernel log)");
        }
        if std::time::Instant::now() > end {
            bail!("the kernel did not register tpm{n} within 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn state_dir_label(p: &Path) -> String {
    p.display().to_string()
}

/// A uuid's 16 bytes from its text form.
fn uuid_bytes(s: &str) -> Option<[u8; 16]> {
    let canon = xvtpm_xen::xenbus::parse_uuid("--vtpm-uuid", s.as_bytes()).ok()?;
    let hex: String = canon.chars().filter(|c| *c != '-').collect();
    let mut u = [0u8; 16];
    for (i, b) in u.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(u)
}
