//! `xvtpmd`: serves every vtpm device of its domain (dom0, or a driver domain) with no
//! per-guest command: a `vtpm serve` per vTPM, started when its device appears, restarted when
//! it dies, stopped when its device goes. In dom0 it also tells vTPMs served by other domains
//! (stub domains) their guests' lives.

mod config;
mod devices;
mod layout;
mod lives;
mod provision;
mod sandbox;
mod status;
mod supervisor;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use std::os::unix::fs::DirBuilderExt;

use anyhow::Context;
use clap::Parser;
use xvtpm_xen::xenbus::vtpm_backend_root;
use xvtpm_xen::Xen;

use provision::{Keys, Spec};
use supervisor::Supervisor;

const TOKEN: &str = "xvtpmd";
const LIVES_TOKEN: &str = "xvtpmd-lives";

/// Serve every vtpm device of this domain. Options given here override the configuration file.
#[derive(Parser)]
#[command(name = "xvtpmd", version)]
struct Cli {
    /// The configuration file (TOML; its keys are these options' names). Default:
    /// /etc/xvtpm/xvtpmd.toml if it exists.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Writes the man page and shell completions under DIR and exits (for packaging).
    #[arg(long, value_name = "DIR", hide = true)]
    generate_docs: Option<PathBuf>,
    /// The vtpm executable [default: /usr/bin/vtpm].
    #[arg(long, value_name = "PATH")]
    vtpm: Option<PathBuf>,
    /// Each vTPM's state lives in `<DIR>/<uuid>` [default: /var/lib/xvtpm/vtpms].
    #[arg(long, value_name = "DIR")]
    state_root: Option<PathBuf>,
    /// Where the vtpms keep the volatile snapshots that let a restarted vtpm resume its guest's
    /// TPM (memory-backed storage is enough) [default: /run/xvtpm/snapshots].
    #[arg(long, value_name = "DIR")]
    snapshot_dir: Option<PathBuf>,
    /// Create a vTPM the first time its device appears, instead of refusing the device.
    #[arg(long)]
    auto_create: bool,
    /// The manager's vTPM socket: every vTPM's key is kept there (each vtpm binds with its own
    /// token, in `<state-root>/<uuid>/token`). Needs --admin-socket.
    #[arg(long, value_name = "PATH")]
    manager_socket: Option<PathBuf>,
    /// The manager's admin socket: where vTPMs created here are provisioned.
    #[arg(long, value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    /// The manager's group that vTPMs created here go into [default: 0].
    #[arg(long)]
    group: Option<u32>,
    /// Serve vTPMs without keys (no manager): their state is integrity-checked, not
    /// encrypted.
    #[arg(long)]
    insecure_keyless: bool,
    /// vTPMs created are TPM 1.2 (default TPM 2.0; `tpm-version` in the file).
    #[arg(long = "tpm1.2")]
    tpm12: bool,
    /// Where to write what `xvtpm status` shows (JSON) [default: /run/xvtpm/xvtpmd.json].
    #[arg(long, value_name = "FILE")]
    status_file: Option<PathBuf>,
    /// How long creating one vTPM may take (the manager's provisioning, each of its answers,
    /// and `vtpm create`) before it is given up and undone; meanwhile no other device is
    /// looked at [default: 60].
    #[arg(long, value_name = "SECONDS")]
    create_timeout_secs: Option<u64>,
    /// Run the vtpms as root, without their sandboxes (uid of their own, no capabilities, a
    /// root holding only their own directories, a system-call filter). Logged as a warning.
    #[arg(long)]
    no_sandbox: bool,
    /// The first of the uids the vTPMs run as, one each [default: 1879048192 (0x70000000)].
    #[arg(long, value_name = "UID")]
    sandbox_uid_base: Option<u32>,
    /// How many uids there are for vTPMs [default: 65536].
    #[arg(long, value_name = "N")]
    sandbox_uid_count: Option<u32>,
    /// The group (name or number) every vtpm is also in: the group the manager's socket
    /// belongs to (`vtpmmgr serve --socket-group`) [default: xvtpm].
    #[arg(long, value_name = "GROUP")]
    sandbox_group: Option<String>,
    /// Use the simulated Xen in this directory instead of /dev/xen and xenstored.
    #[arg(long, value_name = "DIR", requires = "domid")]
    sim: Option<PathBuf>,
    /// Our domain id (default: from xenstore).
    #[arg(long)]
    domid: Option<u16>,
    /// Serve no vTPM in this domain: only tell the vTPMs that other domains serve (vTPM stub
    /// domains) their guests' lives, which lets them resume a running guest's TPM. Needs no
    /// keys or state. (Done in dom0 in any case.)
    #[arg(long)]
    stub_domains_only: bool,
    /// The host's boot as told to vTPM domains (default: the kernel's
    /// /proc/sys/kernel/random/boot_id); for tests that play a host reboot.
    #[arg(long, value_name = "ID", hide = true)]
    host_boot_id: Option<String>,
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    if let Some(dir) = &cli.generate_docs {
        return Ok(xvtpm_cli::docs::generate(<Cli as clap::CommandFactory>::command(), dir)?);
    }
    let file = config::File::load(cli.config.as_deref())?;
    if cli.stub_domains_only || file.stub_domains_only.unwrap_or(false) {
        if sandbox::is_root() {
            // Reading xenstore and asking Xen about domains needs no capability as root.
            xvtpm_vtpm::sys::caps::keep_only(&[]).context("drop capabilities")?;
        }
        let xen: Arc<dyn Xen> = xvtpm_xen::open(cli.sim.as_deref(), cli.domid).context("cannot reach Xen")?;
        return serve_lives_only(&*xen, cli.host_boot_id);
    }
    let cli_sandbox = (cli.no_sandbox, cli.sandbox_uid_base, cli.sandbox_uid_count, cli.sandbox_group.clone());
    let sandbox = sandboxing(&cli_sandbox, &file, cli.sim.is_some())?;

    let manager = (cli.manager_socket.or(file.manager_socket), cli.admin_socket.or(file.admin_socket));
    let keyless = cli.insecure_keyless || file.insecure_keyless.unwrap_or(false);
    let keys = match manager {
        (Some(_), Some(_)) if keyless => anyhow::bail!("a manager and insecure-keyless: choose one"),
        (Some(socket), Some(admin)) => Keys::Manager { socket, admin, group: cli.group.or(file.group).unwrap_or(0) },
        (Some(_), None) | (None, Some(_)) => {
            anyhow::bail!("the manager needs both its sockets (manager-socket, admin-socket)")
        }
        (None, None) if keyless => {
            log::warn!(
                "serving vTPMs without keys (insecure-keyless): their state is integrity-checked, not encrypted"
            );
            Keys::None
        }
        (None, None) => anyhow::bail!(
            "where are the vTPMs' keys? Give the manager (manager-socket and admin-socket), or \
             insecure-keyless for vTPMs whose state is integrity-checked but not encrypted"
        ),
    };
    let state_root = cli.state_root.or(file.state_root).unwrap_or_else(|| PathBuf::from(layout::DEFAULT_STATE_ROOT));
    let snapshot_dir =
        cli.snapshot_dir.or(file.snapshot_dir).unwrap_or_else(|| PathBuf::from(xvtpm_vtpm::snapshot::DEFAULT_DIR));
    let status_file = cli.status_file.or(file.status_file).unwrap_or_else(|| PathBuf::from(status::DEFAULT_PATH));
    if let (Some(_), Keys::Manager { socket, .. }) = (&sandbox, &keys) {
        sandbox::check_socket_dir(socket, &state_root, &snapshot_dir).map_err(anyhow::Error::msg)?;
    }
    if sandbox.is_some() {
        // Before any thread: each has its own capability sets.
        xvtpm_vtpm::sys::caps::keep_only(sandbox::KEPT_CAPABILITIES).context("drop capabilities")?;
    }
    let xen: Arc<dyn Xen> = xvtpm_xen::open(cli.sim.as_deref(), cli.domid).context("cannot reach Xen")?;
    let me = xen.domid();
    let xs = xen.xenstore().context("xenstore")?;
    // Private: vTPM state and snapshots (the vtpm makes its own directories 0700 too).
    for dir in [&state_root, &snapshot_dir] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("create {}", dir.display()))?;
    }
    if let Some(parent) = status_file.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    let spec = Spec {
        vtpm: cli.vtpm.or(file.vtpm).unwrap_or_else(|| PathBuf::from("/usr/bin/vtpm")),
        state_root,
        keys,
        snapshot_dir,
        auto_create: cli.auto_create || file.auto_create.unwrap_or(false),
        tpm12: cli.tpm12 || file.tpm_version == Some(config::TpmVersion::V12),
        create_timeout: Duration::from_secs(cli.create_timeout_secs.or(file.create_timeout_secs).unwrap_or(60).max(1)),
        sim: cli.sim.map(|d| (d, me)),
        sandbox,
    };
    let waker = xs.waker();
    let stop = xvtpm_vtpm::sys::signals::on_stop(move || waker.wake()).context("signal handling")?;
    let root = vtpm_backend_root(me);
    xs.watch(&root, TOKEN).with_context(|| format!("watch {root}"))?;
    if me == 0 {
        // HVM guests' TPMs: their wrappers' requests.
        let hvm = xvtpm_xen::xenbus::HVM_REQUEST_ROOT;
        xs.watch(hvm, TOKEN).with_context(|| format!("watch {hvm}"))?;
    }
    log::info!("xvtpmd: domain {me} watching {root}");
    let lives = watch_lives(&xs, me, cli.host_boot_id)?;
    let mut sup = Supervisor::new(spec, xs.clone(), me, xs.waker());
    let served = serve(&xs, &*xen, &mut sup, &status_file, lives, stop);
    log::info!("xvtpmd: stopping every vtpm");
    sup.stop_all(Duration::from_secs(10));
    let _ = std::fs::remove_file(&status_file);
    let _ = xs.unwatch(&root, TOKEN);
    if me == 0 {
        let _ = xs.unwatch(xvtpm_xen::xenbus::HVM_REQUEST_ROOT, TOKEN);
        for path in [lives::WATCH, lives::RELEASE] {
            let _ = xs.unwatch(path, LIVES_TOKEN);
        }
    }
    served
}

/// In dom0 (which alone may read every guest's life): the watches for [`lives`] and a first
/// pass to make, for the host boot `boot` (the kernel's if not given); elsewhere none.
fn watch_lives(xs: &xvtpm_xen::Xenstore, me: u16, boot: Option<String>) -> anyhow::Result<Option<lives::Pending>> {
    if me != 0 {
        return Ok(None);
    }
    let boot = match boot {
        Some(b) => b,
        None => std::fs::read_to_string(lives::BOOT_ID)
            .with_context(|| format!("read {}", lives::BOOT_ID))?
            .trim()
            .to_string(),
    };
    for path in [lives::WATCH, lives::RELEASE] {
        xs.watch(path, LIVES_TOKEN).with_context(|| format!("watch {path}"))?;
    }
    log::info!("xvtpmd: telling vTPMs served by other domains their guests' lives (host boot {boot})");
    Ok(Some(lives::Pending::all(boot)))
}

/// `--stub-domains-only`: the guests' lives, until a stop signal.
fn serve_lives_only(xen: &dyn Xen, boot: Option<String>) -> anyhow::Result<()> {
    let me = xen.domid();
    if me != 0 {
        anyhow::bail!("--stub-domains-only in domain {me}: only dom0 may read the guests' lives");
    }
    let xs = xen.xenstore().context("xenstore")?;
    let waker = xs.waker();
    let stop = xvtpm_vtpm::sys::signals::on_stop(move || waker.wake()).context("signal handling")?;
    let Some(mut pending) = watch_lives(&xs, me, boot)? else { anyhow::bail!("not dom0") };
    if let Err(e) = xvtpm_cli::notify::ready("telling vTPM stub domains their guests' lives") {
        log::warn!("cannot tell systemd that xvtpmd is ready: {e}");
    }
    while !stop.load(Ordering::SeqCst) {
        pending.run(&xs, xen, me);
        let mut ev = xs.next_event(None)?;
        while let Some(e) = ev {
            if e.token == LIVES_TOKEN {
                pending.note(&e.path, me);
            }
            ev = xs.next_event(Some(Duration::ZERO))?;
        }
    }
    for path in [lives::WATCH, lives::RELEASE] {
        let _ = xs.unwatch(path, LIVES_TOKEN);
    }
    Ok(())
}

/// The vtpms' sandbox from the command line (`no_sandbox`, uid base and count, group) over the
/// file. The simulated Xen (tests) has none: its devices are files a sandbox could not open.
fn sandboxing(
    cli: &(bool, Option<u32>, Option<u32>, Option<String>),
    file: &config::File,
    sim: bool,
) -> anyhow::Result<Option<sandbox::Sandboxing>> {
    let (no_sandbox, base, count, group) = cli;
    if *no_sandbox || !file.sandbox.unwrap_or(true) {
        log::warn!(
            "the vtpms run as root without a sandbox (sandbox = false): a guest that takes over its vtpm has the host"
        );
        return Ok(None);
    }
    if sim {
        log::info!("the simulated Xen: vtpms run without a sandbox");
        return Ok(None);
    }
    if !sandbox::is_root() {
        anyhow::bail!("sandboxing the vtpms needs root: run xvtpmd as root, or set sandbox = false (the vtpms then run as this user)");
    }
    let name = group.clone().or_else(|| file.sandbox_group.clone());
    let group = match name.as_deref() {
        Some(g) => Some(xvtpm_cli::users::group_id(g).with_context(|| format!("no group {g:?}"))?),
        None => {
            let g = xvtpm_cli::users::group_id(sandbox::DEFAULT_GROUP);
            if g.is_none() {
                log::warn!(
                    "no group {:?}: the vtpms reach the manager's socket only if it lets every user connect",
                    sandbox::DEFAULT_GROUP
                );
            }
            g
        }
    };
    let s = sandbox::Sandboxing {
        uid_base: base.or(file.sandbox_uid_base).unwrap_or(sandbox::DEFAULT_UID_BASE),
        uid_count: count.or(file.sandbox_uid_count).unwrap_or(sandbox::DEFAULT_UID_COUNT).max(1),
        group,
    };
    if s.uid_base == 0 {
        anyhow::bail!("sandbox-uid-base 0 is root's");
    }
    log::info!("each vtpm runs in its sandbox, as a uid of its own from {} ({} of them)", s.uid_base, s.uid_count);
    Ok(Some(s))
}

/// The main loop, until a stop signal or a xenstore failure.
fn serve(
    xs: &xvtpm_xen::Xenstore,
    xen: &dyn Xen,
    sup: &mut Supervisor,
    status_file: &std::path::Path,
    mut lives: Option<lives::Pending>,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<()> {
    let me = xen.domid();
    let mut rescan = true;
    let mut written = None;
    let mut announced = false;
    let mut listed = false;
    loop {
        while let Ok(exit) = sup.exits.try_recv() {
            sup.exited(exit);
        }
        sup.restart_due();
        if rescan {
            // A failed read is never taken for "no devices": the next event rescans.
            let listed_now = devices::list(xs, me).and_then(|mut d| {
                if me == 0 {
                    d.extend(devices::list_hvm(xs, xen)?);
                }
                Ok(d)
            });
            match listed_now {
                Ok(devices) => {
                    sup.reconcile(&devices);
                    listed = true;
                }
                Err(e) => log::warn!("cannot list the vtpm devices: {e}; will look again"),
            }
        }
        if let Some(pending) = lives.as_mut() {
            pending.run(xs, xen, me);
        }
        // Rewritten only when it changed: every vtpm's own xenstore writes wake this loop too.
        let now = sup.status();
        if written.as_ref() != Some(&now) {
            status::write(status_file, &now);
            written = Some(now);
        }
        if !announced && listed {
            // Every device there at the start has its vtpm (or its refusal): guests started
            // after us (by xendomains, ordered after this service) find the service ready.
            announced = true;
            if let Err(e) = xvtpm_cli::notify::ready("serving the vtpm devices of this domain") {
                log::warn!("cannot tell systemd that xvtpmd is ready: {e}");
            }
        }
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        // No timeout unless a restart is due: device changes, exits and stop wake us. A burst
        // of changes needs one rescan. Of the changes anywhere in xenstore (the lives' watch),
        // only those that may change a life are looked at.
        rescan = false;
        let mut ev = xs.next_event(sup.next_due())?;
        while let Some(e) = ev {
            if e.token == LIVES_TOKEN {
                if let Some(pending) = lives.as_mut() {
                    pending.note(&e.path, me);
                }
                // A domain ended: an HVM guest's TPM may go with it.
                rescan |= e.path == lives::RELEASE && sup.serves_hvm();
            } else {
                rescan = true;
            }
            ev = xs.next_event(Some(Duration::ZERO))?;
        }
    }
}
