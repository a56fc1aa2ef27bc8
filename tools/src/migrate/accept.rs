//! The destination's end: `xvtpm migrate-accept`, run by the transport (e.g. `ssh HOST xvtpm
//! migrate-accept`) with the source's relay on its stdin and stdout. It starts the guest's
//! vtpm before xl builds the domain (`vtpm serve --incoming`: libxl waits for the vtpm
//! device's backend), runs `xl migrate-receive`, and, when the source offers the vTPM, writes
//! its state directory, snapshot and token in place and imports its key at this host's
//! manager. If the migration then fails here, all of it is undone.
//!
//! An HVM guest's vTPM is xvtpmd's: it goes into xvtpmd's state root, marked arriving (so
//! that the guest's device-model wrapper starts QEMU without it), and xvtpmd starts its vtpm
//! once it is in place; the source hears "accepted" only when that vtpm serves the guest's
//! registers.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use xvtpm_vtpmmgr::admin::Admin;

use super::lock;
use super::wire::{self, Hello, Kind};

/// Where the destination keeps what arrives.
#[derive(Args, Debug, Clone)]
pub struct AcceptOpts {
    /// vTPM state directories live in DIR/<device uuid>, tokens in DIR/<device uuid>.token.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/xvtpm")]
    pub state_root: PathBuf,
    /// Where the vtpm keeps its snapshots (its `--snapshot-dir`).
    #[arg(long, value_name = "DIR", default_value = xvtpm_vtpm::snapshot::DEFAULT_DIR)]
    pub snapshot_dir: PathBuf,
    /// This host's manager: its admin socket.
    #[arg(long, value_name = "PATH", default_value = "/run/xvtpm/admin.sock")]
    pub admin_socket: PathBuf,
    /// This host's manager: its vTPM socket.
    #[arg(long, value_name = "PATH", default_value = "/run/xvtpm/mgr/vtpm.sock")]
    pub manager_socket: PathBuf,
    /// The vtpm executable.
    #[arg(long, value_name = "PATH", default_value = "vtpm")]
    pub vtpm: PathBuf,
    /// The vtpm's log goes to DIR/vtpm-<device uuid>.log.
    #[arg(long, value_name = "DIR", default_value = "/var/log/xvtpm")]
    pub log_dir: PathBuf,
    /// xvtpmd's state root (its `state-root`), where an HVM guest's vTPM goes.
    #[arg(long, value_name = "DIR", default_value = crate::daemon_layout::DEFAULT_STATE_ROOT)]
    pub vtpms: PathBuf,
    /// How long xvtpmd may take to serve an HVM guest's vTPM once it is in place.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub serve_timeout: u64,
    #[command(flatten)]
    pub xen: crate::XenOpts,
}

/// Only `migrate-receive` and flags reach xl: the source may not run other xl commands here.
fn xl_args_ok(args: &[String]) -> bool {
    args.iter().filter(|a| *a == "migrate-receive").count() == 1
        && args.iter().all(|a| {
            a == "migrate-receive"
                || (a.len() > 1 && a.starts_with('-') && a[1..].bytes().all(|b| b.is_ascii_alphabetic()))
        })
}

/// What was set up here, to undo if the migration fails.
#[derive(Debug)]
struct Incoming {
    state_dir: PathBuf,
    token: PathBuf,
    snapshots: [PathBuf; 2],
    /// A PV guest's vtpm, started here.
    vtpm: Option<Child>,
    /// An HVM guest's vTPM directory in xvtpmd's root (xvtpmd serves it).
    hvm_dir: Option<PathBuf>,
    /// Its `arriving` mark, locked while this process runs.
    _mark: Option<std::fs::File>,
    imported: Option<[u8; 16]>,
}

impl Incoming {
    fn undo(mut self, opts: &AcceptOpts) {
        if let Some(v) = self.vtpm.as_mut() {
            let _ = v.kill();
            let _ = v.wait();
        }
        // First out of xvtpmd's sight, at once (a rename), and out of the way of a vtpm still
        // writing into it; then the key; then the files.
        let hidden = self.hvm_dir.as_ref().and_then(|d| tombstone(d));
        if let Some(u) = self.imported {
            match Admin::connect(&opts.admin_socket).and_then(|mut a| a.delete(&u)) {
                Ok(()) => log::info!("the imported vTPM is deleted again"),
                Err(e) => log::error!("the imported vTPM could not be deleted: {e}"),
            }
        }
        for p in self.snapshots.iter().chain([&self.token]) {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
        if let Some(d) = hidden {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Renames `dir` to a hidden name beside it (removed next): a directory that vanishes at
/// once, so that nothing takes it for a vTPM while it is removed. `None` if it is not there.
pub fn tombstone(dir: &Path) -> Option<PathBuf> {
    let name = dir.file_name()?.to_string_lossy().into_owned();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let hidden = dir.with_file_name(format!(".{name}.removed-{}-{nanos}", std::process::id()));
    match std::fs::rename(dir, &hidden) {
        Ok(()) => Some(hidden),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            // Removed in place then: gone is what matters.
            log::warn!("cannot move {} out of the way ({e}); removing it where it is", dir.display());
            Some(dir.to_path_buf())
        }
    }
}

fn refuse(out: &Mutex<std::io::Stdout>, why: &str) -> anyhow::Error {
    let _ = wire::send(&mut *lock(out), Kind::Refused, why.as_bytes());
    anyhow::anyhow!("{why}")
}

/// Runs the destination's end on stdin and stdout.
pub fn run(opts: &AcceptOpts) -> anyhow::Result<()> {
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let mut input = std::io::stdin().lock();
    let hello: Hello = match wire::recv(&mut input)? {
        Some((Kind::Hello, b)) => serde_json::from_slice(&b).context("a malformed hello")?,
        other => return Err(refuse(&out, &format!("expected a hello, got {:?}", other.map(|(k, _)| k)))),
    };
    if hello.protocol != wire::PROTOCOL {
        return Err(refuse(&out, &format!("protocol {:?}, this end speaks {:?}", hello.protocol, wire::PROTOCOL)));
    }
    let device =
        xvtpm_proto::Uuid::parse(&hello.device_uuid).map_err(|e| refuse(&out, &format!("device uuid: {e}")))?;
    let vtpm = xvtpm_proto::Uuid::parse(&hello.vtpm_uuid).map_err(|e| refuse(&out, &format!("vTPM uuid: {e}")))?;
    if !xl_args_ok(&hello.xl_args) {
        return Err(refuse(&out, &format!("xl arguments {:?} are not `migrate-receive` and flags", hello.xl_args)));
    }
    // Paths and arguments use the canonical form, never the peer's text.
    let name = device.to_string();
    let hello = Hello { device_uuid: name.clone(), vtpm_uuid: vtpm.to_string(), ..hello };
    let set_up = if hello.hvm { arrive_hvm(opts, &hello) } else { arrive_pv(opts, &hello) };
    let mut incoming = Some(set_up.map_err(|e| refuse(&out, &format!("{e:#}")))?);

    let mut xl = match Command::new("xl").args(&hello.xl_args).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn() {
        Ok(c) => c,
        Err(e) => {
            if let Some(i) = incoming.take() {
                i.undo(opts);
            }
            return Err(refuse(&out, &format!("cannot run xl: {e}")));
        }
    };
    let mut xl_in = xl.stdin.take();
    let mut xl_out = xl.stdout.take().context("xl stdout")?;
    // The source's stream carries the guest's memory, which may hold any bytes: "go" is
    // looked for only after this xl said "ready" (its own output is protocol, not memory).
    let receiver_ready = Arc::new(AtomicBool::new(false));
    let up = out.clone();
    let said_ready = receiver_ready.clone();
    let pump = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        let mut ready = wire::Watch::new(wire::RECEIVER_READY);
        loop {
            let n = match xl_out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if ready.feed(&buf[..n]).is_some() {
                said_ready.store(true, Ordering::SeqCst);
            }
            if wire::send(&mut *lock(&up), Kind::Xl, &buf[..n]).is_err() {
                return;
            }
        }
        let _ = wire::send(&mut *lock(&up), Kind::XlEnd, &[]);
    });
    // The guest may run here only with its vTPM: a "go" before the vTPM is taken ends xl's
    // stream (xl then fails, and all is undone), and only one offer is taken. Once "go" has
    // reached xl, the guest may run here: nothing is undone after that.
    let mut go = wire::Watch::new(wire::PERMISSION_TO_GO);
    let (mut taken, mut went) = (false, false);
    loop {
        let frame = match wire::recv(&mut input) {
            Ok(f) => f,
            Err(e) => {
                log::error!("the source's stream broke: {e}");
                None
            }
        };
        match frame {
            Some((Kind::Xl, b)) => {
                if receiver_ready.load(Ordering::SeqCst) && !went && go.feed(&b).is_some() {
                    if taken {
                        went = true;
                    } else if xl_in.take().is_some() {
                        log::error!("the source let the guest go before its vTPM was here; the migration is stopped");
                    }
                }
                if let Some(w) = xl_in.as_mut() {
                    if w.write_all(&b).is_err() {
                        xl_in = None;
                    }
                }
            }
            Some((Kind::XlEnd, _)) => xl_in = None,
            Some((Kind::Offer, b)) => {
                let answer = match incoming.as_mut() {
                    Some(_) if taken => Err(anyhow::anyhow!("the vTPM was taken already; a second offer is refused")),
                    Some(i) => install(opts, &hello, i, &b),
                    None => Err(anyhow::anyhow!("nothing is set up for the vTPM")),
                };
                match answer {
                    Ok(()) => {
                        taken = true;
                        wire::send(&mut *lock(&out), Kind::Accepted, &[])?;
                    }
                    Err(e) => {
                        log::error!("the vTPM could not be taken: {e:#}");
                        // Undone before the source hears it: it takes the vTPM back, and no
                        // second copy may stay here.
                        if !taken {
                            if let Some(i) = incoming.take() {
                                i.undo(opts);
                            }
                        }
                        wire::send(&mut *lock(&out), Kind::Refused, format!("{e:#}").as_bytes())?;
                    }
                }
            }
            Some((other, _)) => log::warn!("ignored a {other:?} frame from the source"),
            None => break,
        }
    }
    drop(xl_in);
    let status = xl.wait()?;
    let _ = pump.join();
    if status.success() {
        log::info!("the guest runs here; its vTPM {} is served by the vtpm started for it", hello.device_uuid);
        return Ok(());
    }
    if went {
        // xl unpauses the guest before it reports: it may run here with this vTPM, whose
        // copy at the source is frozen. Kept; the operator looks first.
        bail!(
            "xl migrate-receive failed ({status}) after the guest was cleared to run here: its vTPM {} is kept; \
             check the guest here (xl list) before anything else",
            hello.vtpm_uuid
        );
    }
    if let Some(i) = incoming.take() {
        i.undo(opts);
    }
    bail!("xl migrate-receive failed ({status}); what came for the vTPM is removed")
}

/// A PV guest's vTPM: its state directory and token beside it in `--state-root`, served by a
/// `vtpm serve --incoming` started now.
fn arrive_pv(opts: &AcceptOpts, hello: &Hello) -> anyhow::Result<Incoming> {
    let name = &hello.device_uuid;
    let state_dir = opts.state_root.join(name);
    let token = opts.state_root.join(format!("{name}.token"));
    let occupied =
        std::fs::read_dir(&state_dir).map(|d| d.flatten().any(|e| e.file_name() != ".lock")).unwrap_or(false);
    if occupied || token.exists() {
        bail!("a vTPM for device {name} already lives here ({})", state_dir.display());
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&opts.state_root)?;
    std::fs::create_dir_all(&opts.log_dir)?;
    let vtpm = start_vtpm(opts, hello, &state_dir, &token)?;
    let snapshots = xvtpm_vtpm::snapshot::SnapshotFile::for_state_dir(&opts.snapshot_dir, &state_dir)?.paths().clone();
    Ok(Incoming { state_dir, token, snapshots, vtpm: Some(vtpm), hvm_dir: None, _mark: None, imported: None })
}

/// An HVM guest's vTPM: its directory in xvtpmd's root, marked arriving (the mark locked
/// while this process runs, so that xvtpmd tells an arrival cut short), for xvtpmd to serve
/// once it is complete.
fn arrive_hvm(opts: &AcceptOpts, hello: &Hello) -> anyhow::Result<Incoming> {
    use crate::daemon_layout::{ARRIVING, STATE, TOKEN};
    let name = &hello.device_uuid;
    if hello.vtpm_uuid != *name {
        bail!("an HVM guest's vTPM is named by its domain's uuid, not {}", hello.vtpm_uuid);
    }
    let dir = opts.vtpms.join(name);
    if dir.exists() {
        bail!(
            "a vTPM {name} already lives here ({}): if it is a copy left by a migration that failed, \
             `xvtpm vtpm delete {name}` and remove the directory",
            dir.display()
        );
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&opts.vtpms)?;
    std::fs::DirBuilder::new().mode(0o700).create(&dir).with_context(|| format!("create {}", dir.display()))?;
    let state_dir = dir.join(STATE);
    let mark = (|| -> anyhow::Result<std::fs::File> {
        std::fs::DirBuilder::new().mode(0o700).create(&state_dir)?;
        // Locked before it carries its name: xvtpmd never sees it unlocked while we run.
        let part = dir.join(format!(".{ARRIVING}"));
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&part)?;
        f.try_lock()?;
        f.write_all(std::process::id().to_string().as_bytes())?;
        std::fs::rename(&part, dir.join(ARRIVING))?;
        Ok(f)
    })();
    let mark = match mark {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.context(format!("prepare {}", dir.display())));
        }
    };
    let snapshot_dir = opts.snapshot_dir.join(name);
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&snapshot_dir)?;
    let snapshots = xvtpm_vtpm::snapshot::SnapshotFile::for_state_dir(&snapshot_dir, &state_dir)?.paths().clone();
    Ok(Incoming {
        state_dir,
        token: dir.join(TOKEN),
        snapshots,
        vtpm: None,
        hvm_dir: Some(dir),
        _mark: Some(mark),
        imported: None,
    })
}

/// Tells xvtpmd that an HVM guest's vTPM is in place (in the arriving guest's request
/// directory, found by the uuid), and waits until its vtpm serves the guest's registers with
/// the TPM resumed (a vtpm that serves but refuses the guest has not taken it).
fn serve_hvm(opts: &AcceptOpts, uuid: &str) -> anyhow::Result<()> {
    use xvtpm_xen::xenbus::{
        HVM_ARRIVED_KEY, HVM_ERROR_KEY, HVM_INCOMING_KEY, HVM_REQUEST_ROOT, HVM_STATE_KEY, HVM_UUID_KEY,
    };
    use xvtpm_xen::TxId;
    let xs = opts.xen.open()?.xenstore()?;
    let end = Instant::now() + Duration::from_secs(opts.serve_timeout);
    let read = |p: &str| xs.try_read(TxId::NONE, p).map(|v| v.map(|v| String::from_utf8_lossy(&v).trim().to_string()));
    let mut told: Option<String> = None;
    loop {
        if told.is_none() {
            let doms = match xs.directory(TxId::NONE, HVM_REQUEST_ROOT) {
                Err(e) if e.is_enoent() => Vec::new(),
                r => r?,
            };
            for d in doms {
                let dir = format!("{HVM_REQUEST_ROOT}/{d}");
                if read(&format!("{dir}/{HVM_UUID_KEY}"))?.as_deref() == Some(uuid)
                    && read(&format!("{dir}/{HVM_INCOMING_KEY}"))?.as_deref() == Some("1")
                {
                    // A rescan of xvtpmd's: it starts the vtpm now that the vTPM is complete.
                    xs.write(TxId::NONE, &format!("{dir}/{HVM_ARRIVED_KEY}"), b"1")?;
                    told = Some(dir);
                    break;
                }
            }
        }
        if let Some(dir) = &told {
            match read(&format!("{dir}/{HVM_STATE_KEY}"))?.as_deref() {
                Some("ready") => match read(&format!("{dir}/{HVM_ERROR_KEY}"))? {
                    None => return Ok(()),
                    Some(why) => bail!("the arrived vTPM refuses the guest: {why}"),
                },
                Some("refused") => {
                    let why = read(&format!("{dir}/{HVM_ERROR_KEY}"))?.unwrap_or_default();
                    bail!("xvtpmd refused the arrived vTPM: {why}");
                }
                None => bail!("the guest's TPM request went away"),
                _ => {}
            }
        }
        if Instant::now() > end {
            bail!(
                "xvtpmd did not serve the vTPM within {} s ({}); see its log",
                opts.serve_timeout,
                if told.is_some() { "told it arrived" } else { "no arriving guest asked for it" }
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `vtpm serve --incoming` for the device, in its own process group (it outlives this
/// process: it is the guest's vtpm here from now on), and waits until it serves the device.
fn start_vtpm(opts: &AcceptOpts, hello: &Hello, state_dir: &Path, token: &Path) -> anyhow::Result<Child> {
    let log = opts.log_dir.join(format!("vtpm-{}.log", hello.device_uuid));
    let file = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&log)?;
    let mut cmd = Command::new(&opts.vtpm);
    cmd.args(["serve", "--incoming", "--uuid", &hello.device_uuid, "--state-dir"])
        .arg(state_dir)
        .arg("--manager")
        .arg(format!("unix:{}", opts.manager_socket.display()))
        .args(["--vtpm-uuid", &hello.vtpm_uuid, "--token-file"])
        .arg(token)
        .arg("--snapshot-dir")
        .arg(&opts.snapshot_dir);
    if hello.tpm12 {
        cmd.arg("--tpm1.2");
    }
    let start = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .process_group(0)
        .spawn()
        .with_context(|| format!("start {}", opts.vtpm.display()))?;
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read(&log).unwrap_or_default();
        if text.get(start as usize..).is_some_and(|t| t.windows(8).any(|w| w == b"watching")) {
            return Ok(child);
        }
        if child.try_wait()?.is_some() || Instant::now() > end {
            let _ = child.kill();
            bail!("the incoming vtpm did not start; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes what the source offered and imports the key at this host's manager.
fn install(opts: &AcceptOpts, hello: &Hello, incoming: &mut Incoming, offer: &[u8]) -> anyhow::Result<()> {
    let files: BTreeMap<String, Vec<u8>> =
        xvtpm_vtpm::state::managed::decode(offer).context("a malformed offer from the source")?;
    let write = |path: &Path, data: &[u8]| xvtpm_vtpm::state::write_file(path, data, xvtpm_vtpm::state::PRIVATE);
    let mut offered = [false; 2];
    for (name, data) in &files {
        if let Some(file) = name.strip_prefix("state/") {
            if file.is_empty() || file.contains('/') || file == "." || file == ".." {
                bail!("a state file named {file:?}");
            }
            write(&incoming.state_dir.join(file), data)?;
        } else if let Some(slot) = name.strip_prefix("snapshot/") {
            let i = match slot {
                "a" => 0,
                "b" => 1,
                _ => bail!("a snapshot slot named {slot:?}"),
            };
            write(&incoming.snapshots[i], data)?;
            offered[i] = true;
        }
    }
    // A slot the source did not send is not this vTPM's now (it would compete with the sent one).
    for (slot, sent) in incoming.snapshots.iter().zip(offered) {
        if !sent {
            if let Err(e) = std::fs::remove_file(slot) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    bail!("cannot clear snapshot slot {}: {e}", slot.display());
                }
            }
        }
    }
    write(&incoming.token, files.get("token").context("the offer has no token")?)?;
    // After "go" this is the only copy: the names as durable as the bytes.
    let mut dirs = vec![incoming.state_dir.clone()];
    dirs.extend(incoming.snapshots[0].parent().map(Path::to_path_buf));
    dirs.extend(incoming.token.parent().map(Path::to_path_buf));
    for d in &dirs {
        sync_dir(d)?;
    }
    let bundle = files.get("bundle").context("the offer has no key bundle")?;
    let uuid = Admin::connect(&opts.admin_socket)?.import(bundle, 0)?;
    let want = xvtpm_proto::Uuid::parse(&hello.vtpm_uuid)?.0;
    incoming.imported = Some(uuid);
    if uuid != want {
        bail!("the bundle holds vTPM {}, not {}", xvtpm_proto::Uuid(uuid), hello.vtpm_uuid);
    }
    if let Some(dir) = &incoming.hvm_dir {
        use crate::daemon_layout::{ARRIVING, MADE, VERSION};
        write(&dir.join(VERSION), if hello.tpm12 { b"1.2\n" } else { b"2.0\n" })?;
        // Complete from here on: `made` first, then the mark goes.
        write(&dir.join(MADE), b"")?;
        std::fs::remove_file(dir.join(ARRIVING)).with_context(|| format!("remove {}", dir.join(ARRIVING).display()))?;
        sync_dir(dir)?;
        sync_dir(&opts.vtpms)?;
        serve_hvm(opts, &hello.vtpm_uuid)?;
        log::info!("vTPM {} taken: xvtpmd serves it to the guest", hello.vtpm_uuid);
        return Ok(());
    }
    log::info!("vTPM {} taken: state, snapshot and key are here", hello.vtpm_uuid);
    Ok(())
}

/// Makes the names in `dir` durable.
fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("sync {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_migrate_receive_and_flags_reach_xl() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(xl_args_ok(&a(&["migrate-receive"])));
        assert!(xl_args_ok(&a(&["-v", "migrate-receive", "-e", "-p"])));
        assert!(!xl_args_ok(&a(&["destroy", "1"])));
        assert!(!xl_args_ok(&a(&["migrate-receive", "; rm"])));
        assert!(!xl_args_ok(&a(&["migrate-receive", "migrate-receive"])));
        assert!(!xl_args_ok(&a(&["migrate-receive", "-"])));
        assert!(!xl_args_ok(&a(&[])));
    }
}
