//! `xvtpm container`: vTPMs for Linux containers through the kernel's vTPM proxy. Each one is
//! a `vtpm proxy` daemon serving a /dev/tpmN (and /dev/tpmrmN) from its own encrypted state.
//!
//! Layout: `<root>/<name>/` holds `config` (the TPM version), `key` (the state key, 0600) and
//! `state/`; `<run-dir>/<name>.json` is the running daemon's device description (written by
//! the daemon once the kernel has registered the device) and `<run-dir>/<name>.log` its log.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use xvtpm_vtpm::proxy_info::ProxyInfo;
use xvtpm_vtpmmgr::admin::Admin;
use xvtpm_vtpmmgr::uuid_str;

/// The container's vTPM named does not exist (exit code 3).
#[derive(Debug)]
pub(crate) struct NoSuchContainer(pub String);

impl std::fmt::Display for NoSuchContainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no container vTPM named {:?}", self.0)
    }
}

impl std::error::Error for NoSuchContainer {}

#[derive(Args, Debug)]
pub(crate) struct ContainerArgs {
    /// Where the container vTPMs' states and keys live.
    #[arg(long, global = true, value_name = "DIR", default_value = "/var/lib/xvtpm/containers")]
    root: PathBuf,
    /// Where the running ones' device descriptions and logs go.
    #[arg(long, global = true, value_name = "DIR", default_value = "/run/xvtpm/containers")]
    run_dir: PathBuf,
    /// The vtpm executable (default: next to xvtpm, else from PATH).
    #[arg(long, global = true, value_name = "PATH")]
    vtpm: Option<PathBuf>,
    #[command(subcommand)]
    cmd: ContainerCmd,
}

#[derive(Subcommand, Debug)]
enum ContainerCmd {
    /// Create a container vTPM (a new TPM with its own key) and start it: the kernel makes
    /// /dev/tpmN and /dev/tpmrmN. Prints the device numbers for the container's device node.
    Create {
        /// Its name (letters, digits, '-', '_', '.').
        name: String,
        /// A TPM 1.2 instead of a TPM 2.0.
        #[arg(long = "tpm1.2")]
        tpm12: bool,
        /// Only create it; `start` later.
        #[arg(long)]
        no_start: bool,
        /// Keep the state's key at the vTPM manager (sealed by the hardware TPM) instead of a
        /// key file: the manager's vTPM socket. Needs --admin-socket.
        #[arg(long, value_name = "PATH", requires = "admin_socket")]
        manager_socket: Option<PathBuf>,
        /// With --manager-socket: the manager's admin socket, to provision the vTPM there (and
        /// to delete it at `destroy`).
        #[arg(long, value_name = "PATH", requires = "manager_socket")]
        admin_socket: Option<PathBuf>,
        /// With --manager-socket: the manager's group to provision it into.
        #[arg(long, default_value_t = 0, requires = "manager_socket")]
        group: u32,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Start a stopped container vTPM from its state (a new /dev/tpmN; the number may differ).
    Start {
        /// Its name.
        name: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Stop a container vTPM: its device goes away, its state stays.
    Stop {
        /// Its name.
        name: String,
    },
    /// Stop a container vTPM and delete its state and key.
    Destroy {
        /// Its name.
        name: String,
    },
    /// List the container vTPMs, running or not.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn run(a: ContainerArgs) -> anyhow::Result<()> {
    let c = Containers { root: a.root, run: a.run_dir, vtpm: a.vtpm.unwrap_or_else(default_vtpm) };
    match a.cmd {
        ContainerCmd::Create { name, tpm12, no_start, json, manager_socket, admin_socket, group } => {
            let manager = match (manager_socket, admin_socket) {
                (Some(vtpm), Some(admin)) => Some(ManagerCfg { vtpm, admin, uuid: String::new(), group }),
                _ => None,
            };
            c.create(&name, tpm12, manager)?;
            if no_start {
                match json {
                    true => outln!("{}", json!({"name": name, "running": false})),
                    false => outln!("created {name}"),
                }
                return Ok(());
            }
            let info = c.start(&name)?;
            print_started(&name, &info, json);
        }
        ContainerCmd::Start { name, json } => {
            let info = c.start(&name)?;
            print_started(&name, &info, json);
        }
        ContainerCmd::Stop { name } => {
            c.existing(&name)?;
            match c.stop(&name)? {
                true => outln!("stopped {name}"),
                false => outln!("{name} was not running"),
            }
        }
        ContainerCmd::Destroy { name } => {
            let dir = c.existing(&name)?;
            c.stop(&name)?;
            // The manager's record first: if that fails, the state stays, and so does a way to
            // retry.
            if let Some(m) = c.config(&dir)?.manager {
                let uuid =
                    xvtpm_proto::Uuid::parse(&m.uuid).with_context(|| format!("{}/config: uuid", dir.display()))?.0;
                Admin::connect(&m.admin)
                    .and_then(|mut a| a.delete(&uuid))
                    .with_context(|| format!("delete vTPM {} at the manager ({})", m.uuid, m.admin.display()))?;
            }
            fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
            let _ = fs::remove_file(c.run.join(format!("{name}.log")));
            outln!("destroyed {name}");
        }
        ContainerCmd::List { json } => c.list(json)?,
    }
    Ok(())
}

/// `fields` followed by those of the daemon's description.
fn with_info(mut fields: Value, info: &ProxyInfo) -> Value {
    if let (Some(obj), Ok(Value::Object(i))) = (fields.as_object_mut(), serde_json::to_value(info)) {
        obj.extend(i);
    }
    fields
}

fn print_started(name: &str, info: &ProxyInfo, json: bool) {
    if json {
        outln!("{}", with_info(json!({"name": name, "running": true}), info));
    } else {
        let mut s = format!("{name}: {} ({}:{})", info.device, info.major, info.minor);
        if let (Some(rm), Some(maj), Some(min)) = (&info.rm_device, info.rm_major, info.rm_minor) {
            s += &format!(", {rm} ({maj}:{min})");
        }
        outln!("{s}; TPM {}, pid {}", info.version, info.pid);
    }
}

/// The vtpm next to this executable, else the one on PATH.
fn default_vtpm() -> PathBuf {
    std::env::current_exe()
        .ok()
        .map(|e| e.with_file_name("vtpm"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("vtpm"))
}

/// Where a container vTPM's key is kept, when not in a key file.
#[derive(Debug, Clone)]
struct ManagerCfg {
    /// The manager's vTPM socket.
    vtpm: PathBuf,
    /// Its admin socket.
    admin: PathBuf,
    /// The vTPM's uuid at the manager.
    uuid: String,
    /// Its group there.
    group: u32,
}

/// A container vTPM's `config`.
#[derive(Debug)]
struct Config {
    tpm12: bool,
    manager: Option<ManagerCfg>,
}

struct Containers {
    root: PathBuf,
    run: PathBuf,
    vtpm: PathBuf,
}

fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok {
        bail!("bad name {name:?}: letters, digits, '-', '_' and '.', not starting with '.'");
    }
    Ok(())
}

impl Containers {
    fn dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        check_name(name)?;
        Ok(self.root.join(name))
    }

    fn existing(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.dir(name)?;
        if !dir.join("config").exists() {
            return Err(NoSuchContainer(name.to_string()).into());
        }
        Ok(dir)
    }

    fn create(&self, name: &str, tpm12: bool, mut manager: Option<ManagerCfg>) -> anyhow::Result<()> {
        let dir = self.dir(name)?;
        fs::create_dir_all(&self.root).with_context(|| format!("create {}", self.root.display()))?;
        fs::create_dir(&dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => anyhow::anyhow!("container vTPM {name:?} exists ({})", dir.display()),
            _ => anyhow::Error::new(e).context(format!("create {}", dir.display())),
        })?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        let mut provisioned: Option<([u8; 16], PathBuf)> = None;
        let made = (|| -> anyhow::Result<()> {
            let mut secret = [0u8; 32];
            fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut secret)).context("read /dev/urandom")?;
            // A key file, or the token that identifies the vTPM at the manager.
            let file = if manager.is_some() { "token" } else { "key" };
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(dir.join(file))
                .and_then(|mut f| std::io::Write::write_all(&mut f, &secret))
                .with_context(|| format!("write the {file}"))?;
            if let Some(m) = manager.as_mut() {
                let mut admin = Admin::connect(&m.admin)
                    .with_context(|| format!("connect to the manager's admin socket {}", m.admin.display()))?;
                let uuid =
                    admin.provision(None, m.group, Some(&secret)).context("provision the vTPM at the manager")?;
                provisioned = Some((uuid, m.admin.clone()));
                m.uuid = uuid_str(&uuid);
            }
            fs::create_dir(dir.join("state"))?;
            let mut cmd = Command::new(&self.vtpm);
            cmd.arg("create").args(self.state_args(&dir, &Config { tpm12, manager: manager.clone() }));
            let out = cmd.output().with_context(|| format!("run {}", self.vtpm.display()))?;
            if !out.status.success() {
                bail!("vtpm create failed: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            // Written last: a directory without it is an unfinished create.
            let mut cfg = format!("tpm={}\n", if tpm12 { "1.2" } else { "2.0" });
            if let Some(m) = &manager {
                cfg += &format!(
                    "manager={}\nadmin={}\nuuid={}\ngroup={}\n",
                    m.vtpm.display(),
                    m.admin.display(),
                    m.uuid,
                    m.group
                );
            }
            fs::write(dir.join("config"), cfg)?;
            Ok(())
        })();
        if let Err(e) = made {
            // Undo: nothing half-made stays, here or at the manager.
            if let Some((uuid, admin)) = provisioned {
                if let Err(d) = Admin::connect(&admin).and_then(|mut a| a.delete(&uuid)) {
                    log::warn!("could not delete vTPM {} at the manager again: {d}", uuid_str(&uuid));
                }
            }
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
        log::info!("created {name} in {}", dir.display());
        Ok(())
    }

    fn state_args(&self, dir: &Path, cfg: &Config) -> Vec<String> {
        let mut a = vec!["--state-dir".to_string(), dir.join("state").display().to_string()];
        match &cfg.manager {
            None => a.extend(["--key".to_string(), dir.join("key").display().to_string()]),
            Some(m) => a.extend([
                "--manager".to_string(),
                format!("unix:{}", m.vtpm.display()),
                "--vtpm-uuid".to_string(),
                m.uuid.clone(),
                "--token-file".to_string(),
                dir.join("token").display().to_string(),
            ]),
        }
        if cfg.tpm12 {
            a.push("--tpm1.2".to_string());
        }
        a
    }

    fn config(&self, dir: &Path) -> anyhow::Result<Config> {
        let text = fs::read_to_string(dir.join("config")).with_context(|| format!("read {}/config", dir.display()))?;
        let get = |k: &str| text.lines().find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix('=')));
        let tpm12 = match get("tpm") {
            Some("1.2") => true,
            Some("2.0") => false,
            other => bail!("{}/config: unknown tpm={other:?}", dir.display()),
        };
        let manager = match (get("manager"), get("admin"), get("uuid")) {
            (None, None, None) => None,
            (Some(v), Some(a), Some(u)) => Some(ManagerCfg {
                vtpm: PathBuf::from(v),
                admin: PathBuf::from(a),
                uuid: u.to_string(),
                group: get("group").and_then(|g| g.parse().ok()).unwrap_or(0),
            }),
            _ => bail!("{}/config: manager, admin and uuid go together", dir.display()),
        };
        Ok(Config { tpm12, manager })
    }

    /// The running daemon's description, or None when it does not run. A description left by
    /// a daemon that died is removed.
    fn running(&self, name: &str) -> Option<ProxyInfo> {
        let file = self.run.join(format!("{name}.json"));
        let info = ProxyInfo::from_json(&fs::read_to_string(&file).ok()?).ok()?;
        let pid = info.pid;
        if alive(pid) {
            Some(info)
        } else {
            log::warn!("{name}: its vtpm (pid {pid}) is gone; removing {}", file.display());
            let _ = fs::remove_file(&file);
            None
        }
    }

    fn start(&self, name: &str) -> anyhow::Result<ProxyInfo> {
        let dir = self.existing(name)?;
        if let Some(info) = self.running(name) {
            bail!("{name} already runs: {}", info.to_json());
        }
        fs::create_dir_all(&self.run).with_context(|| format!("create {}", self.run.display()))?;
        let info_file = self.run.join(format!("{name}.json"));
        let log_file = self.run.join(format!("{name}.log"));
        let log = fs::File::create(&log_file).with_context(|| format!("create {}", log_file.display()))?;
        let mut cmd = Command::new(&self.vtpm);
        cmd.arg("proxy").args(self.state_args(&dir, &self.config(&dir)?)).arg("--info-file").arg(&info_file);
        // Its own process group: a Ctrl-C at the operator's terminal does not reach it.
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("run {}", self.vtpm.display()))?;
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            // The daemon writes the file whole (a rename), so what is there is complete.
            if let Ok(info) = fs::read_to_string(&info_file) {
                if !info.trim().is_empty() {
                    return ProxyInfo::from_json(&info)
                        .with_context(|| format!("{}: not a vtpm proxy description", info_file.display()));
                }
            }
            if let Some(status) = child.try_wait()? {
                let log = fs::read_to_string(&log_file).unwrap_or_default();
                bail!("vtpm proxy exited ({status}) before its device was ready:\n{}", log.trim());
            }
            if Instant::now() > end {
                let _ = child.kill();
                bail!("vtpm proxy's device was not ready within 120 s (log: {})", log_file.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the daemon if it runs; whether it did.
    fn stop(&self, name: &str) -> anyhow::Result<bool> {
        let Some(info) = self.running(name) else { return Ok(false) };
        let pid = info.pid;
        xvtpm_vtpm::sys::signals::terminate(pid).with_context(|| format!("signal vtpm (pid {pid})"))?;
        let end = Instant::now() + Duration::from_secs(30);
        while alive(pid) {
            if Instant::now() > end {
                bail!("vtpm (pid {pid}) did not stop within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = fs::remove_file(self.run.join(format!("{name}.json")));
        Ok(true)
    }

    fn list(&self, json: bool) -> anyhow::Result<()> {
        let mut names: Vec<String> = match fs::read_dir(&self.root) {
            Ok(d) => d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("read {}", self.root.display())),
        };
        names.sort();
        let mut rows = Vec::new();
        for name in names {
            let dir = self.root.join(&name);
            if check_name(&name).is_err() || !dir.join("config").exists() {
                continue;
            }
            let cfg = self.config(&dir)?;
            let version = if cfg.tpm12 { "1.2" } else { "2.0" };
            let key = match &cfg.manager {
                Some(m) => json!({"key": "manager", "vtpm_uuid": m.uuid}),
                None => json!({"key": "file"}),
            };
            let info = self.running(&name);
            rows.push((name, version, key, info));
        }
        if json {
            let items: Vec<Value> = rows
                .iter()
                .map(|(name, version, key, info)| {
                    let mut row = json!({"name": name, "running": info.is_some()});
                    if let (Some(r), Some(k)) = (row.as_object_mut(), key.as_object()) {
                        r.extend(k.clone());
                    }
                    match info {
                        Some(i) => with_info(row, i),
                        None => {
                            row["version"] = json!(version);
                            row
                        }
                    }
                })
                .collect();
            outln!("{}", Value::Array(items));
        } else {
            for (name, version, _, info) in &rows {
                match info {
                    Some(i) => outln!("{name}\tTPM {version}\trunning\t{}\tpid {}", i.device, i.pid),
                    None => outln!("{name}\tTPM {version}\tstopped"),
                }
            }
        }
        Ok(())
    }
}

/// Whether process `pid` runs and is a `vtpm proxy` (not a zombie, not a reused pid).
fn alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the parenthesised command name.
    let state = stat.rsplit_once(')').and_then(|(_, r)| r.trim_start().chars().next());
    if matches!(state, Some('Z') | Some('X') | None) {
        return false;
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.get(1) == Some(&&b"proxy"[..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemons_fields_follow_ours() {
        let j =
            r#"{"tpm_num":3,"version":"2.0","device":"/dev/tpm3","major":10,"minor":224,"pid":77,"state_dir":"/x"}"#;
        let info = ProxyInfo::from_json(j).expect("the daemon's description");
        assert_eq!(
            with_info(json!({"name": "web", "running": true}), &info).to_string(),
            format!(r#"{{"name":"web","running":true,{}"#, &j[1..])
        );
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", ".", "..", "a/b", ".hidden", "a b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["web-1", "db_2", "x.y"] {
            assert!(check_name(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn this_process_is_not_a_vtpm() {
        assert!(!alive(std::process::id()));
        assert!(!alive(u32::MAX));
    }
}
