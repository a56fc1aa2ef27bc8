//! `xvtpm`: the operator's tool: vTPMs and groups at the manager, the stub domains' disks and
//! domain files, container vTPMs (Linux's vTPM proxy), state-file inspection, and
//! the tpmif diagnostics (an echo backend to check that a guest's vtpm device connects, and a
//! frontend that measures the round trip; both on the real Xen interfaces unless `--sim`).
//!
//! Exit codes: 0 success, 1 failure, 2 usage error, 3 no such vTPM, group or container vTPM.

#![forbid(unsafe_code)]

/// `println!` that ends the process quietly, with success, when stdout is gone: a reader that
/// closes the pipe (`xvtpm vtpm list | head`) has what it wanted. Any other write error is
/// reported and ends the process with status 1.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($t)*) {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                eprintln!("xvtpm: writing to stdout: {e}");
                std::process::exit(1);
            }
            std::process::exit(0);
        }
    }};
}

mod admin;
mod container;
// What xvtpmd writes for `xvtpm status`: one definition for both binaries.
#[path = "daemon/status.rs"]
mod daemon_status;
// xvtpmd's state root, which `xvtpm migrate` moves HVM guests' vTPMs out of and into.
#[path = "daemon/layout.rs"]
#[allow(dead_code)] // Shared with xvtpmd, which uses all of it; this tool a part.
mod daemon_layout;
mod inspect;
mod migrate;
mod qemu_dm;
mod stubdom;
mod xenadmin;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use xvtpm_backend::{Backend, BackendConfig, DeviceFilter, EchoHandler};
use xvtpm_frontend::{Frontend, FrontendConfig};
use xvtpm_xen::Xen;

#[derive(Parser, Debug)]
#[command(
    name = "xvtpm",
    version,
    about = "Xen virtual TPM stack: operator tool",
    after_help = "Exit codes: 0 success, 1 failure, 2 usage error, 3 no such vTPM, group or container vTPM."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct XenOpts {
    /// Use the simulated Xen in this directory instead of /dev/xen and xenstored.
    #[arg(long, value_name = "DIR")]
    sim: Option<PathBuf>,
    /// Our domain id (default: read from xenstore; required with --sim).
    #[arg(long)]
    domid: Option<u16>,
}

impl XenOpts {
    pub(crate) fn open(&self) -> anyhow::Result<Arc<dyn Xen>> {
        xvtpm_xen::open(self.sim.as_deref(), self.domid).context("cannot reach Xen (is this a Xen domain?)")
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// vTPMs at the manager: provision, list, show, delete, and moving one to another manager.
    #[command(subcommand)]
    Vtpm(admin::VtpmCmd),
    /// Groups at the manager: new, list, delete, and the boot hashes their vTPMs may run with.
    #[command(subcommand)]
    Group(admin::GroupCmd),
    /// Print a boot hash, as the manager measures a vTPM: of the vtpm executable (--exe) or of
    /// a vTPM domain's image (--kernel, --ramdisk, --cmdline). `xvtpm group approve` takes the
    /// same arguments.
    Measure {
        #[command(flatten)]
        what: admin::MeasureArgs,
    },
    /// Stub domains: make the manager's and a guest's vTPM domain (disk and domain file).
    #[command(subcommand)]
    Stubdom(stubdom::StubdomCmd),
    /// vTPMs for Linux containers through the kernel's vTPM proxy (/dev/vtpmx): create,
    /// start, stop, destroy, list.
    Container(container::ContainerArgs),
    /// Live-migrate a guest with its vTPM to another host: `xl migrate` with the vTPM handed to
    /// the destination's manager between the guest's suspend here and its resume there. The
    /// destination runs `xvtpm migrate-accept` (through `--via`, ssh by default).
    Migrate(migrate::MigrateArgs),
    /// The source's transport for `xl migrate` (run by `xvtpm migrate`, not by hand).
    #[command(hide = true)]
    MigrateRelay {
        /// The plan `xvtpm migrate` wrote.
        #[arg(long, value_name = "FILE")]
        plan: PathBuf,
        /// What xl appends: the host, then `xl migrate-receive ...`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The destination's end of `xvtpm migrate` (run by its transport, with the source on stdin
    /// and stdout): starts the guest's vtpm, runs `xl migrate-receive`, takes the vTPM.
    MigrateAccept {
        #[command(flatten)]
        opts: migrate::accept::AcceptOpts,
    },
    /// An HVM domain's device model with a TPM: asks dom0's xvtpmd for the domain's TPM,
    /// waits until it is served, then runs Debian's QEMU with the same arguments. Named by the
    /// domain file, through its wrapper: `device_model_override =
    /// "/usr/lib/xvtpm/xvtpm-qemu-dm"`.
    QemuDm(qemu_dm::QemuDmArgs),
    /// Write the ACPI TPM2 table an HVM domain file passes with `acpi_firmware=` for measured
    /// boot (the package installs it as /usr/lib/xvtpm/acpi-tpm2.bin; docs/hvm.md).
    HvmAcpiTable {
        /// Where the table goes.
        file: PathBuf,
        /// Room for the firmware's event log, in bytes (SeaBIOS takes it from its own memory,
        /// which has room for a few hundred KiB at most).
        #[arg(long, default_value_t = xvtpm_vtpm::hvm::acpi::DEFAULT_LOG_LEN,
              value_parser = clap::value_parser!(u32).range(4096..=262_144))]
        log_size: u32,
    },
    /// Show a vTPM state file's format, protection and size (never its contents).
    InspectState {
        /// The file.
        file: PathBuf,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Serve vtpm devices with a backend that echoes every command back: checks that guests'
    /// xen-tpmfront devices connect to this domain, without any TPM behind them.
    EchoBackend {
        #[command(flatten)]
        xen: XenOpts,
        /// Serve only the device with this uuid (default: every vtpm device of this domain).
        #[arg(long)]
        uuid: Option<String>,
    },
    /// The vTPMs `xvtpmd` serves: guest, uuid, state, pid, uptime, restarts, last error.
    Status {
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// The file `xvtpmd` writes.
        #[arg(long, value_name = "FILE", default_value = daemon_status::DEFAULT_PATH)]
        status_file: PathBuf,
    },
    /// Connect this domain's vtpm device (a user-space tpmfront) and time round trips of a
    /// small command. The backend must echo or answer it.
    Ping {
        #[command(flatten)]
        xen: XenOpts,
        /// Device handle (`device/vtpm/<handle>`).
        #[arg(long, default_value_t = 0)]
        handle: u32,
        /// Number of round trips.
        #[arg(long, default_value_t = 1000)]
        count: usize,
    },
    /// Writes this tool's man pages and shell completions under DIR (for packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// Where `man1/` and `completions/` go.
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The diagnostics' progress is worth seeing; a management command prints its answer and
    // only warnings besides.
    let quiet = matches!(cli.command, Command::Vtpm(_) | Command::Group(_) | Command::Container(_));
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(if quiet { "warn" } else { "info" }))
        .init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xvtpm: {e:#}");
            let missing = matches!(
                e.downcast_ref::<xvtpm_vtpmmgr::Error>(),
                Some(xvtpm_vtpmmgr::Error::UnknownVtpm(_) | xvtpm_vtpmmgr::Error::NotFound(_))
            ) || e.downcast_ref::<container::NoSuchContainer>().is_some();
            if missing {
                ExitCode::from(3)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Vtpm(c) => admin::vtpm(c)?,
        Command::Group(c) => admin::group(c)?,
        Command::Stubdom(c) => stubdom::run(c)?,
        Command::Container(c) => container::run(c)?,
        Command::GenerateDocs { dir } => xvtpm_cli::docs::generate(<Cli as clap::CommandFactory>::command(), &dir)?,
        Command::Measure { what } => outln!("{}", xvtpm_vtpmmgr::hex(&what.boot_hash()?)),
        Command::InspectState { file, json } => inspect::inspect_state(&file, json)?,
        Command::Migrate(a) => migrate::migrate(a)?,
        Command::QemuDm(a) => qemu_dm::run(a)?,
        Command::HvmAcpiTable { file, log_size } => {
            std::fs::write(&file, xvtpm_vtpm::hvm::acpi::tpm2_table(log_size))
                .with_context(|| format!("write {}", file.display()))?;
        }
        Command::MigrateRelay { plan, args } => migrate::relay::run(&plan, &args)?,
        Command::MigrateAccept { opts } => migrate::accept::run(&opts)?,
        Command::EchoBackend { xen, uuid } => {
            let filter = uuid.map(DeviceFilter::Uuid).unwrap_or(DeviceFilter::All);
            let backend = Backend::new(xen.open()?, Arc::new(EchoHandler), BackendConfig::serving(filter));
            backend.run(&xvtpm_backend::StopSignal::default())?;
        }
        Command::Status { json, status_file } => {
            let all = daemon_status::read(&status_file)
                .with_context(|| format!("read {} (is xvtpmd running?)", status_file.display()))?;
            if json {
                outln!("{}", serde_json::to_string(&all)?);
            } else {
                outln!(
                    "{:<6} {:<6} {:<36} {:<10} {:>8} {:>8} {:>8}  LAST ERROR",
                    "GUEST",
                    "HANDLE",
                    "UUID",
                    "STATE",
                    "PID",
                    "UPTIME",
                    "RESTARTS"
                );
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                for s in all {
                    let pid = s.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
                    let uptime = s.started_unix.map(|t| now.saturating_sub(t)).unwrap_or(0);
                    outln!(
                        "{:<6} {:<6} {:<36} {:<10} {:>8} {:>7}s {:>8}  {}",
                        s.guest,
                        s.handle,
                        s.uuid,
                        s.state,
                        pid,
                        uptime,
                        s.restarts,
                        s.last_error.unwrap_or_default()
                    );
                }
            }
        }
        Command::Ping { xen, handle, count } => {
            let xen = xen.open()?;
            let mut fe = Frontend::connect(xen.as_ref(), FrontendConfig { handle, ..Default::default() })?;
            // TPM2_GetRandom(16): a real command, so the same check works against a vTPM.
            let cmd = [0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 0x10];
            let mut samples = Vec::with_capacity(count);
            for _ in 0..count {
                let t = Instant::now();
                fe.transmit(&cmd)?;
                samples.push(t.elapsed());
            }
            samples.sort_unstable();
            let median = samples.get(samples.len() / 2).copied().unwrap_or(Duration::ZERO);
            outln!("{count} round trips on device {handle}: median {:.1} µs", median.as_secs_f64() * 1e6);
            fe.close()?;
        }
    }
    Ok(())
}
