//! The source's end: `xvtpm migrate-relay`, which `xl migrate -s` runs as its transport. It
//! carries xl's stream to `xvtpm migrate-accept` at the destination, and holds back the
//! destination's "ready" until the guest's vTPM is there: the suspended snapshot, the state
//! directory, the token and the key (exported to the destination's manager) go across, and only
//! once the destination has imported them does xl hear "ready" and send "go". If the hand-over
//! fails, the vTPM is taken back here (exported to this manager and imported), and xl, which
//! never hears "ready", resumes the guest here.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use xvtpm_vtpmmgr::admin::Admin;

use super::lock;
use super::wire::{self, Hello, Kind, Watch};

/// What `xvtpm migrate` hands the relay (a JSON file, mode 0600).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// The transport: a shell command whose stdin and stdout reach `xvtpm migrate-accept` at
    /// the destination; `{host}` is replaced by the host xl names.
    pub via: String,
    /// This host's manager.
    pub admin_socket: PathBuf,
    /// The destination manager's migration key (hex).
    pub to: String,
    /// The guest's vtpm device uuid.
    pub device_uuid: String,
    /// The vTPM's uuid at the manager.
    pub vtpm_uuid: String,
    /// A TPM 1.2.
    pub tpm12: bool,
    /// An HVM guest's vTPM (xvtpmd's, named by the domain's uuid).
    #[serde(default)]
    pub hvm: bool,
    /// The vTPM's state directory, token file and snapshot slots here.
    pub state_dir: PathBuf,
    /// The token file.
    pub token_file: PathBuf,
    /// The snapshot slot files.
    pub snapshots: [PathBuf; 2],
    /// Where the relay records how far it got: `accepted`, `go`, `taken-back`.
    pub status: PathBuf,
}

fn note(plan: &Plan, what: &str) {
    if let Err(e) = std::fs::write(&plan.status, what) {
        log::error!("cannot record the migration's progress in {}: {e}", plan.status.display());
    }
}

/// Runs the relay: `args` are what xl appended (the host, then `xl` and its arguments).
pub fn run(plan_file: &std::path::Path, args: &[String]) -> anyhow::Result<()> {
    let plan: Plan = serde_json::from_slice(&std::fs::read(plan_file).context("read the migration plan")?)
        .context("parse the migration plan")?;
    let (host, rest) = args.split_first().context("xl gave no host")?;
    let xl_args: Vec<String> = match rest.split_first() {
        Some((xl, a)) if xl == "xl" => a.to_vec(),
        _ => bail!("expected `HOST xl migrate-receive ...` after the plan, got {args:?}"),
    };
    let cmd = plan.via.replace("{host}", host);
    let mut transport = Command::new("sh")
        .arg("-c")
        .arg(&cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("start the transport `{cmd}`"))?;
    let to_dst = Arc::new(Mutex::new(transport.stdin.take().context("transport stdin")?));
    let mut from_dst = transport.stdout.take().context("transport stdout")?;
    let hello = Hello {
        protocol: wire::PROTOCOL.into(),
        device_uuid: plan.device_uuid.clone(),
        vtpm_uuid: plan.vtpm_uuid.clone(),
        tpm12: plan.tpm12,
        xl_args,
        hvm: plan.hvm,
    };
    wire::send(&mut *lock(&to_dst), Kind::Hello, &serde_json::to_vec(&hello)?)?;

    // xl -> destination, watching for "go" once the vTPM is handed over (before that, xl's
    // stream is the guest's memory, which may hold any bytes; xl says "go" only after the
    // "ready" this relay forwards once the vTPM is there).
    let up = to_dst.clone();
    let plan_up = plan.clone();
    let handed = Arc::new(AtomicBool::new(false));
    let handed_up = handed.clone();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut go = Watch::new(wire::PERMISSION_TO_GO);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if handed_up.load(Ordering::SeqCst) && go.feed(&buf[..n]).is_some() {
                note(&plan_up, "go");
            }
            if wire::send(&mut *lock(&up), Kind::Xl, &buf[..n]).is_err() {
                return;
            }
        }
        let _ = wire::send(&mut *lock(&up), Kind::XlEnd, &[]);
    });

    // destination -> xl, holding "ready" until the vTPM is there.
    let mut stdout = std::io::stdout().lock();
    let mut ready = Watch::new(wire::RECEIVER_READY);
    let mut handed_over = false;
    while let Some((kind, payload)) = wire::recv(&mut from_dst)? {
        match kind {
            Kind::Xl => {
                let at = if handed_over { None } else { ready.feed(&payload) };
                let Some(at) = at else {
                    stdout.write_all(&payload)?;
                    stdout.flush()?;
                    continue;
                };
                stdout.write_all(&payload[..at])?;
                stdout.flush()?;
                let started = Instant::now();
                if let Err(e) = hand_over(&plan, &to_dst, &mut from_dst) {
                    log::error!("the vTPM could not move: {e:#}; the guest stays here");
                    take_back(&plan)?;
                    note(&plan, "taken-back");
                    // xl never hears "ready": it resumes the guest here.
                    bail!("migration called off: {e:#}");
                }
                handed_over = true;
                handed.store(true, Ordering::SeqCst);
                note(&plan, "accepted");
                log::info!(
                    "the vTPM is at the destination ({} ms between its \"ready\" and ours)",
                    started.elapsed().as_millis()
                );
                stdout.write_all(&payload[at..])?;
                stdout.flush()?;
            }
            Kind::XlEnd => break,
            Kind::Refused => bail!("the destination refused: {}", String::from_utf8_lossy(&payload)),
            other => bail!("unexpected {other:?} from the destination"),
        }
    }
    Ok(())
}

/// Waits for the source vtpm's suspended snapshot (libxl suspended the guest before its last
/// memory went across), then exports and sends the vTPM, and waits for the destination's
/// answer.
fn hand_over(
    plan: &Plan,
    to_dst: &Mutex<std::process::ChildStdin>,
    from_dst: &mut std::process::ChildStdout,
) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let latest = plan
            .snapshots
            .iter()
            .filter_map(|p| std::fs::read(p).ok())
            .filter_map(|b| xvtpm_vtpm::snapshot::peek(&b))
            .max_by_key(|(seq, _)| *seq);
        match latest {
            Some((_, true)) => break,
            _ if Instant::now() > end => bail!(
                "the vtpm kept no suspended snapshot of the guest in {} (is it serving with snapshots?)",
                plan.snapshots[0].display()
            ),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&plan.state_dir).with_context(|| format!("list {}", plan.state_dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != ".lock" && entry.file_type()?.is_file() {
            files.insert(format!("state/{name}"), std::fs::read(entry.path())?);
        }
    }
    for (slot, path) in ["a", "b"].iter().zip(&plan.snapshots) {
        if let Ok(b) = std::fs::read(path) {
            files.insert(format!("snapshot/{slot}"), b);
        }
    }
    files.insert(
        "token".into(),
        std::fs::read(&plan.token_file).with_context(|| format!("read {}", plan.token_file.display()))?,
    );
    let uuid = crate::admin::uuid_arg(&plan.vtpm_uuid)?;
    let to = crate::admin::migration_key_arg(&plan.to)?;
    // From here on this manager refuses the vTPM: never two live copies.
    let bundle = Admin::connect(&plan.admin_socket)?.export(&uuid, &to, false)?;
    files.insert("bundle".into(), bundle);
    wire::send(&mut *lock(to_dst), Kind::Offer, &xvtpm_vtpm::state::managed::encode(&files))?;
    match wire::recv(from_dst)? {
        Some((Kind::Accepted, _)) => Ok(()),
        Some((Kind::Refused, why)) => bail!("the destination refused the vTPM: {}", String::from_utf8_lossy(&why)),
        Some((k, _)) => bail!("the destination answered the vTPM with {k:?}"),
        None => bail!("the destination went away before taking the vTPM"),
    }
}

/// Undoes an export: the vTPM is exported to this manager's own key and imported here, into
/// its group.
pub fn take_back(plan: &Plan) -> anyhow::Result<()> {
    let uuid = crate::admin::uuid_arg(&plan.vtpm_uuid)?;
    let mut admin = Admin::connect(&plan.admin_socket)?;
    let info = admin.show(&uuid)?;
    if !info.exported {
        return Ok(());
    }
    let own = admin.migration_key()?;
    let bundle = admin.export(&uuid, &own, true)?;
    admin.import(&bundle, info.group)?;
    log::warn!("vTPM {} taken back: it serves the guest here again", plan.vtpm_uuid);
    Ok(())
}
