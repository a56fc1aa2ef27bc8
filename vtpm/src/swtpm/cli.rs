//! swtpm's command line in socket mode (`swtpm socket ...`, as of swtpm 0.7.1), parsed into a
//! [`ServerConfig`] and what the binary needs to build the engine. Sub-options are swtpm's
//! comma-separated `name=value` lists; a bare name is a boolean set to true.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use super::server::{Endpoint, LocalityOptions, ServerConfig, StartupType};
use crate::engine::TpmVersion;
use crate::{Error, Result};

/// The swtpm release whose protocol and command line we follow; reported as our version to
/// tools that ask swtpm for it.
pub const SWTPM_COMPAT_VERSION: &str = "0.7.1";

/// What `swtpm socket ...` asks for.
#[derive(Debug, Clone)]
pub struct SwtpmInvocation {
    /// Text to print on stdout before exiting with status 0 without starting a TPM
    /// (`--help`, `--version`, `--print-capabilities`); the other fields are then incomplete.
    pub print_and_exit: Option<String>,
    /// `--tpm2` gives TPM 2.0; swtpm's default is TPM 1.2.
    pub tpm_version: TpmVersion,
    /// Sockets and protocol behaviour.
    pub server: ServerConfig,
    /// `--tpmstate` (or the `TPM_PATH` environment variable).
    pub state: Option<StateSpec>,
    /// `--key`: the key the state is encrypted with.
    pub key: Option<KeySpec>,
    /// `--pid`: where to write our process id (see [`write_pid_file`]).
    pub pid_file: Option<PathBuf>,
    /// `--log`.
    pub log: Option<LogSpec>,
}

/// `--tpmstate dir=D[,mode=M]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateSpec {
    /// The state directory.
    pub dir: PathBuf,
    /// Permission bits for state files (swtpm's default: 0640).
    pub mode: Option<u32>,
}

/// Where a key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A key file (`file=`, or `fd=N` as `/proc/self/fd/N`).
    File(PathBuf),
    /// A passphrase file to derive the key from (`pwdfile=`, `pwdfd=`).
    Passphrase(PathBuf),
}

/// How a key file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFormat {
    /// Hex digits, optionally after `0x`.
    Hex,
    /// Raw bytes.
    Binary,
}

/// The cipher named by `mode=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMode {
    /// `aes-cbc`, `aes-128-cbc` (swtpm's default).
    Aes128Cbc,
    /// `aes-256-cbc`.
    Aes256Cbc,
}

impl KeyMode {
    /// The key length in bytes.
    pub fn key_len(self) -> usize {
        match self {
            KeyMode::Aes128Cbc => 16,
            KeyMode::Aes256Cbc => 32,
        }
    }
}

/// How a passphrase becomes a key (`kdf=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kdf {
    /// PBKDF2 (swtpm's default).
    Pbkdf2,
    /// SHA-512 of the passphrase.
    Sha512,
}

/// `--key ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    /// The key or passphrase file.
    pub source: KeySource,
    /// `format=` (key files only).
    pub format: KeyFormat,
    /// `mode=`.
    pub mode: KeyMode,
    /// `remove=true`: delete the file once read.
    pub remove: bool,
    /// `kdf=` (passphrases only).
    pub kdf: Kdf,
}

impl KeySpec {
    /// Reads a key file as swtpm does: hex digits (optionally after `0x`, up to whitespace)
    /// or raw bytes, exactly as long as `mode` needs. Does not remove the file.
    pub fn read_key(&self) -> Result<Vec<u8>> {
        let KeySource::File(path) = &self.source else {
            return Err(Error::Config("--key: a passphrase, not a key file; derive the key with the kdf".into()));
        };
        let err = |reason: String| Error::Key { path: path.clone(), reason };
        let raw = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let want = self.mode.key_len();
        let key = match self.format {
            KeyFormat::Binary => raw,
            KeyFormat::Hex => {
                let text = raw.strip_prefix(b"0x").unwrap_or(&raw);
                let end = text.iter().position(|b| b.is_ascii_whitespace()).unwrap_or(text.len());
                let digits = &text[..end];
                if digits.len() % 2 != 0 || !digits.iter().all(u8::is_ascii_hexdigit) {
                    return Err(err("not a hex key".into()));
                }
                digits
                    .chunks(2)
                    .map(|p| {
                        let s = std::str::from_utf8(p).map_err(|_| err("not a hex key".into()))?;
                        u8::from_str_radix(s, 16).map_err(|_| err("not a hex key".into()))
                    })
                    .collect::<Result<Vec<u8>>>()?
            }
        };
        if key.len() != want {
            return Err(err(format!("key has {} bytes; {:?} needs {want}", key.len(), self.mode)));
        }
        Ok(key)
    }
}

/// `--log file=F|fd=N[,level=N][,prefix=P][,truncate]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSpec {
    /// Log file (`-` means no logging).
    pub file: Option<PathBuf>,
    /// Log file descriptor.
    pub fd: Option<i32>,
    /// swtpm's level: 0 nothing, 1 errors and more, 5+ also libtpms' own logging.
    pub level: u32,
    /// Prefix for every line.
    pub prefix: Option<String>,
    /// Truncate the file first.
    pub truncate: bool,
}

/// Writes our process id to `path` (swtpm's `--pid file=`).
pub fn write_pid_file(path: &Path) -> Result<()> {
    std::fs::write(path, std::process::id().to_string())
        .map_err(|e| Error::io(format!("write pid file {}", path.display()), e))
}

/// Parses swtpm's arguments (without the program name): `socket [options]`, `--version` or
/// `--help`. The `TPM_PATH` and `TPM_PORT` environment variables count as swtpm's do.
pub fn parse_swtpm_args(args: &[String]) -> Result<SwtpmInvocation> {
    parse_with_env(args, &|k| std::env::var(k).ok())
}

fn usage() -> String {
    "Usage: swtpm socket [options]\n\
     \n\
     --tpm2                 : TPM 2.0 (the default is TPM 1.2)\n\
     --tpmstate dir=<dir>[,mode=0...]|backend-uri=dir://<dir>\n\
     --server [type=tcp][,port=<port>][,bindaddr=<address>][,disconnect]\n\
     --server type=unixio,path=<path>[,mode=0...][,uid=<uid>][,gid=<gid>]\n\
     -p|--port <port>       : data channel on TCP <port> (one command per connection)\n\
     --ctrl type=tcp,port=<port>[,bindaddr=<address>][,terminate]\n\
     --ctrl type=unixio,path=<path>[,mode=0...][,uid=<uid>][,gid=<gid>][,terminate]\n\
     --flags [not-need-init][,startup-clear|startup-state|startup-deactivated|startup-none]\n\
     --locality [reject-locality-4][,allow-set-locality]\n\
     --key file=<path>|fd=<fd>|pwdfile=<path>|pwdfd=<fd>[,mode=aes-cbc|aes-256-cbc][,format=hex|binary][,remove][,kdf=pbkdf2|sha512]\n\
     --log file=<path>|fd=<fd>[,level=<n>][,prefix=<prefix>][,truncate]\n\
     --pid file=<path>|fd=<fd>\n\
     -t|--terminate         : end when the data connection is lost\n\
     -r|--runas <user>      : accepted only for the current user\n\
     --seccomp action=none|kill|log : accepted and ignored\n\
     --poll-us <n>          : (ours) after answering, poll <n> µs for the next command\n\
                              before sleeping (default 50; 0: never poll)\n\
     --print-capabilities   : print the supported features as JSON\n\
     --version              : print the version\n\
     -h|--help              : this text\n"
        .to_string()
}

fn version_text() -> String {
    format!("TPM emulator version {SWTPM_COMPAT_VERSION} (xvtpm-vtpm {})\n", env!("CARGO_PKG_VERSION"))
}

fn capabilities_json() -> String {
    // Only what we implement; tools like libvirt pass options according to these.
    let features =
        ["tpm-1.2", "tpm-2.0", "tpm-send-command-header", "flags-opt-startup", "cmdarg-seccomp", "cmdarg-key-fd"];
    format!("{}\n", serde_json::json!({"type": "swtpm", "features": features, "version": SWTPM_COMPAT_VERSION}))
}

fn cfg_err(msg: impl Into<String>) -> Error {
    Error::Config(msg.into())
}

/// A parsed `name=value,...` list; lookups return the first occurrence, as swtpm's do.
struct Opts {
    what: &'static str,
    vals: Vec<(&'static str, String)>,
}

impl Opts {
    fn parse(what: &'static str, s: &str, allowed: &[&'static str]) -> Result<Self> {
        let mut vals = Vec::new();
        for tok in s.split(',').filter(|t| !t.is_empty()) {
            let found = allowed.iter().find_map(|&name| {
                if tok == name {
                    Some((name, "true".to_string()))
                } else {
                    let v = tok.strip_prefix(name)?.strip_prefix('=')?;
                    (!v.is_empty()).then(|| (name, v.to_string()))
                }
            });
            match found {
                Some(v) => vals.push(v),
                None => return Err(cfg_err(format!("--{what}: unknown option '{tok}'"))),
            }
        }
        Ok(Self { what, vals })
    }

    fn str(&self, name: &str) -> Option<&str> {
        self.vals.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    fn bool(&self, name: &str) -> bool {
        self.str(name).is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
    }

    fn int(&self, name: &str) -> Result<Option<i64>> {
        self.str(name)
            .map(|v| v.parse::<i64>().map_err(|_| cfg_err(format!("--{}: invalid number '{v}' for {name}", self.what))))
            .transpose()
    }

    fn mode(&self, name: &str) -> Result<Option<u32>> {
        self.str(name)
            .map(|v| match u32::from_str_radix(v, 8) {
                Ok(m) if m <= 0o777 => Ok(m),
                _ => Err(cfg_err(format!("--{}: invalid mode '{v}'", self.what))),
            })
            .transpose()
    }

    fn id(&self, name: &str, db: &str) -> Result<Option<u32>> {
        let Some(v) = self.str(name) else { return Ok(None) };
        if let Ok(n) = v.parse::<u32>() {
            return Ok(Some(n));
        }
        lookup_id(db, v).map(Some).ok_or_else(|| cfg_err(format!("--{}: {name} '{v}' does not exist", self.what)))
    }

    fn unsupported(&self, names: &[&str]) -> Result<()> {
        match names.iter().find(|n| self.str(n).is_some()) {
            Some(n) => Err(cfg_err(format!("--{}: {n}= is not supported", self.what))),
            None => Ok(()),
        }
    }
}

/// The id of a user (`/etc/passwd`) or group (`/etc/group`) name.
fn lookup_id(db: &str, name: &str) -> Option<u32> {
    let text = std::fs::read_to_string(db).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

fn current_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("Uid:")?.split_whitespace().nth(1)?.parse().ok())
}

fn fd_path(what: &str, fd: i64) -> Result<PathBuf> {
    if fd < 0 {
        return Err(cfg_err(format!("--{what}: bad file descriptor {fd}")));
    }
    Ok(PathBuf::from(format!("/proc/self/fd/{fd}")))
}

fn parse_port(what: &str, port: i64) -> Result<u16> {
    u16::try_from(port).map_err(|_| cfg_err(format!("--{what}: port {port} outside the valid range")))
}

fn tcp_endpoint(what: &'static str, o: &Opts, port: u16) -> Result<Endpoint> {
    o.unsupported(&["ifname"])?;
    let bind = o.str("bindaddr").unwrap_or("127.0.0.1");
    let ip: IpAddr =
        bind.parse().map_err(|_| cfg_err(format!("--{what}: could not parse the bind address '{bind}'")))?;
    Ok(Endpoint::Tcp(SocketAddr::new(ip, port)))
}

fn unix_endpoint(what: &'static str, o: &Opts) -> Result<Endpoint> {
    let Some(path) = o.str("path") else {
        return Err(cfg_err(format!("--{what}: type=unixio needs path=")));
    };
    Ok(Endpoint::Unix {
        path: PathBuf::from(path),
        mode: Some(o.mode("mode")?.unwrap_or(0o770)),
        uid: o.id("uid", "/etc/passwd")?,
        gid: o.id("gid", "/etc/group")?,
    })
}

/// `--server ...`: the endpoint and whether to disconnect after each response.
fn parse_server(spec: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<(Endpoint, bool)> {
    const ALLOWED: &[&str] = &["type", "path", "port", "bindaddr", "ifname", "fd", "disconnect", "mode", "uid", "gid"];
    let o = Opts::parse("server", spec, ALLOWED)?;
    // Adopting an inherited descriptor needs unsafe code this module does not have.
    o.unsupported(&["fd"])?;
    let disconnect = o.bool("disconnect");
    match o.str("type").unwrap_or("tcp") {
        "unixio" => Ok((unix_endpoint("server", &o)?, disconnect)),
        "tcp" => {
            let port = match o.int("port")? {
                Some(p) => p,
                None => env("TPM_PORT")
                    .and_then(|p| p.trim().parse().ok())
                    .ok_or_else(|| cfg_err("--server: no port= given, and TPM_PORT is not set or not a number"))?,
            };
            Ok((tcp_endpoint("server", &o, parse_port("server", port)?)?, disconnect))
        }
        t => Err(cfg_err(format!("--server: unsupported socket type '{t}'"))),
    }
}

/// `--ctrl ...`: the endpoint and whether to end when the control connection is lost.
fn parse_ctrl(spec: &str) -> Result<(Endpoint, bool)> {
    const ALLOWED: &[&str] =
        &["type", "path", "port", "bindaddr", "ifname", "fd", "clientfd", "mode", "uid", "gid", "terminate"];
    let o = Opts::parse("ctrl", spec, ALLOWED)?;
    o.unsupported(&["fd", "clientfd"])?;
    let terminate = o.bool("terminate");
    match o.str("type") {
        None => Err(cfg_err("--ctrl: missing type= (tcp or unixio)")),
        Some("unixio") => Ok((unix_endpoint("ctrl", &o)?, terminate)),
        Some("tcp") => {
            let Some(port) = o.int("port")? else { return Err(cfg_err("--ctrl: type=tcp needs port=")) };
            Ok((tcp_endpoint("ctrl", &o, parse_port("ctrl", port)?)?, terminate))
        }
        Some(t) => Err(cfg_err(format!("--ctrl: unsupported control channel type '{t}'"))),
    }
}

fn parse_key(spec: &str) -> Result<KeySpec> {
    const ALLOWED: &[&str] = &["file", "mode", "format", "remove", "pwdfile", "kdf", "fd", "pwdfd"];
    let o = Opts::parse("key", spec, ALLOWED)?;
    let source = if let Some(f) = o.str("file") {
        KeySource::File(PathBuf::from(f))
    } else if let Some(fd) = o.int("fd")? {
        KeySource::File(fd_path("key", fd)?)
    } else if let Some(f) = o.str("pwdfile") {
        KeySource::Passphrase(PathBuf::from(f))
    } else if let Some(fd) = o.int("pwdfd")? {
        KeySource::Passphrase(fd_path("key", fd)?)
    } else {
        return Err(cfg_err("--key: one of file=, fd=, pwdfile= or pwdfd= is required"));
    };
    let format = match o.str("format").unwrap_or("hex") {
        "hex" => KeyFormat::Hex,
        "binary" => KeyFormat::Binary,
        f => return Err(cfg_err(format!("--key: unknown key format '{f}'"))),
    };
    let mode = match o.str("mode").unwrap_or("aes-128-cbc") {
        "aes-cbc" | "aes-128-cbc" => KeyMode::Aes128Cbc,
        "aes-256-cbc" => KeyMode::Aes256Cbc,
        m => return Err(cfg_err(format!("--key: unknown encryption mode '{m}'"))),
    };
    let kdf = match o.str("kdf").unwrap_or("pbkdf2") {
        "pbkdf2" => Kdf::Pbkdf2,
        "sha512" => Kdf::Sha512,
        k => return Err(cfg_err(format!("--key: unknown kdf '{k}'"))),
    };
    Ok(KeySpec { source, format, mode, remove: o.bool("remove"), kdf })
}

fn parse_log(spec: &str) -> Result<LogSpec> {
    let o = Opts::parse("log", spec, &["file", "fd", "level", "prefix", "truncate"])?;
    let file = o.str("file").map(PathBuf::from);
    let fd = o.int("fd")?.map(|v| i32::try_from(v).map_err(|_| cfg_err(format!("--log: bad fd {v}")))).transpose()?;
    let level = o.int("level")?.map(|v| u32::try_from(v).map_err(|_| cfg_err(format!("--log: bad level {v}"))));
    let mut level = level.transpose()?.unwrap_or(0);
    if (file.is_some() || fd.is_some()) && level == 0 {
        level = 1;
    }
    Ok(LogSpec { file, fd, level, prefix: o.str("prefix").map(str::to_string), truncate: o.bool("truncate") })
}

fn parse_tpmstate(spec: &str) -> Result<StateSpec> {
    let o = Opts::parse("tpmstate", spec, &["dir", "mode", "backend-uri"])?;
    let mode = o.mode("mode")?;
    let dir = match (o.str("dir"), o.str("backend-uri")) {
        (Some(d), _) => PathBuf::from(d),
        (None, Some(uri)) => match uri.strip_prefix("dir://") {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => return Err(cfg_err(format!("--tpmstate: unsupported backend-uri '{uri}' (only dir:// is)"))),
        },
        (None, None) => return Err(cfg_err("--tpmstate: dir= or backend-uri= is required")),
    };
    Ok(StateSpec { dir, mode })
}

fn parse_flags(spec: &str, server: &mut ServerConfig, version: TpmVersion) -> Result<()> {
    const ALLOWED: &[&str] = &[
        "not-need-init",
        "startup-none",
        "startup-clear",
        "startup-state",
        "startup-deactivated",
        "disable-auto-shutdown",
    ];
    let o = Opts::parse("flags", spec, ALLOWED)?;
    server.not_need_init |= o.bool("not-need-init");
    // swtpm's precedence when several are given.
    server.startup = if o.bool("startup-clear") {
        Some(StartupType::Clear)
    } else if o.bool("startup-state") {
        Some(StartupType::State)
    } else if o.bool("startup-deactivated") {
        Some(StartupType::Deactivated)
    } else {
        None
    };
    if server.startup == Some(StartupType::Deactivated) && version == TpmVersion::V2_0 {
        return Err(cfg_err("--flags: TPM 2 does not support startup-deactivated"));
    }
    if server.startup.is_some() {
        server.not_need_init = true;
    }
    if o.bool("disable-auto-shutdown") {
        log::debug!("--flags disable-auto-shutdown: we never send TPM2_Shutdown on our own anyway");
    }
    Ok(())
}

fn check_runas(user: &str) -> Result<()> {
    let target = user.parse::<u32>().ok().or_else(|| lookup_id("/etc/passwd", user));
    let Some(target) = target else {
        return Err(cfg_err(format!("--runas: user '{user}' does not exist")));
    };
    if current_uid() == Some(target) {
        log::debug!("--runas {user}: already running as that user");
        return Ok(());
    }
    Err(cfg_err(format!("--runas {user}: changing the user is not supported; start the vTPM as that user")))
}

enum ServerArg {
    Port(u16),
    Spec(String),
}

fn parse_with_env(args: &[String], env: &dyn Fn(&str) -> Option<String>) -> Result<SwtpmInvocation> {
    let mut inv = SwtpmInvocation {
        print_and_exit: None,
        tpm_version: TpmVersion::V1_2,
        server: ServerConfig::default(),
        state: None,
        key: None,
        pid_file: None,
        log: None,
    };
    match args.first().map(String::as_str) {
        Some("socket") => {}
        Some("--version" | "-v") => {
            inv.print_and_exit = Some(version_text());
            return Ok(inv);
        }
        Some("--help" | "-h") => {
            inv.print_and_exit = Some(usage());
            return Ok(inv);
        }
        Some(m @ ("chardev" | "cuse")) => return Err(cfg_err(format!("swtpm {m} is not supported; use 'socket'"))),
        Some(other) => return Err(cfg_err(format!("unknown swtpm interface '{other}'; use 'socket'"))),
        None => return Err(cfg_err("missing the swtpm interface; use 'socket'")),
    }

    let (mut server_arg, mut ctrl, mut key, mut pid, mut log_opt, mut locality, mut tpmstate, mut flags) =
        (None, None, None, None, None, None, None, None);
    let (mut runas, mut seccomp, mut print_caps) = (None, None, false);
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        let (name, inline) = match arg.strip_prefix("--") {
            Some(long) => match long.split_once('=') {
                Some((n, v)) => (format!("--{n}"), Some(v.to_string())),
                None => (arg.clone(), None),
            },
            // Short options may carry their value attached (-p6545).
            None if arg.starts_with('-') && arg.len() > 2 && arg.is_char_boundary(2) => {
                (arg[..2].to_string(), Some(arg[2..].to_string()))
            }
            None => (arg.clone(), None),
        };
        let mut value = || -> Result<String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => rest.next().cloned().ok_or_else(|| cfg_err(format!("option '{name}' needs a value"))),
            }
        };
        match name.as_str() {
            "--tpm2"
            | "--terminate"
            | "-t"
            | "--print-capabilities"
            | "--version"
            | "--help"
            | "-h"
            | "--daemon"
            | "-d"
            | "--print-states"
                if inline.is_some() =>
            {
                return Err(cfg_err(format!("option '{name}' takes no value")));
            }
            "--tpm2" => inv.tpm_version = TpmVersion::V2_0,
            "-t" | "--terminate" => inv.server.terminate_on_data_disconnect = true,
            "--print-capabilities" => print_caps = true,
            "--version" => {
                inv.print_and_exit = Some(version_text());
                return Ok(inv);
            }
            "-h" | "--help" => {
                inv.print_and_exit = Some(usage());
                return Ok(inv);
            }
            "-d" | "--daemon" => {
                return Err(cfg_err("--daemon is not supported: run the vTPM in the foreground under a supervisor"))
            }
            "--print-states" => return Err(cfg_err("--print-states is not supported")),
            "-p" | "--port" => {
                let v = value()?;
                let p =
                    v.trim().parse::<i64>().map_err(|_| cfg_err(format!("cannot parse socket port number '{v}'")))?;
                server_arg = Some(ServerArg::Port(parse_port("port", p)?));
            }
            "-f" | "--fd" => {
                value()?;
                return Err(cfg_err("--fd is not supported: use --server or --ctrl with a path or port"));
            }
            "--server" => server_arg = Some(ServerArg::Spec(value()?)),
            "--ctrl" => ctrl = Some(value()?),
            "--key" => key = Some(value()?),
            "--migration-key" => {
                value()?;
                return Err(cfg_err("--migration-key is not supported: state blobs are migrated unencrypted"));
            }
            "--pid" => pid = Some(value()?),
            "--log" => log_opt = Some(value()?),
            "--locality" => locality = Some(value()?),
            "--tpmstate" => tpmstate = Some(value()?),
            "--flags" => flags = Some(value()?),
            "-r" | "--runas" => runas = Some(value()?),
            "--seccomp" => seccomp = Some(value()?),
            // Ours, not swtpm's: see ServerConfig::poll.
            "--poll-us" => {
                let v = value()?;
                let us = v.trim().parse::<u64>().ok().filter(|&us| us <= 1_000_000);
                let us = us.ok_or_else(|| cfg_err(format!("--poll-us: '{v}' is not a number of µs up to 1000000")))?;
                inv.server.poll = std::time::Duration::from_micros(us);
            }
            n if n.starts_with('-') => return Err(cfg_err(format!("unknown option '{n}'"))),
            n => return Err(cfg_err(format!("unknown parameter '{n}'"))),
        }
    }

    if let Some(l) = &log_opt {
        inv.log = Some(parse_log(l)?);
    }
    if print_caps {
        inv.print_and_exit = Some(capabilities_json());
        return Ok(inv);
    }
    if let Some(user) = &runas {
        check_runas(user)?;
    }
    if let Some(c) = &ctrl {
        let (ep, terminate) = parse_ctrl(c)?;
        inv.server.ctrl = Some(ep);
        inv.server.terminate_on_ctrl_disconnect = terminate;
    }
    match server_arg {
        // swtpm's -p means "--server type=tcp,disconnect" on that port.
        Some(ServerArg::Port(p)) => {
            let port_env = |k: &str| if k == "TPM_PORT" { Some(p.to_string()) } else { env(k) };
            let (ep, disconnect) = parse_server("type=tcp,disconnect", &port_env)?;
            inv.server.data = Some(ep);
            inv.server.disconnect = disconnect;
        }
        Some(ServerArg::Spec(s)) => {
            let (ep, disconnect) = parse_server(&s, env)?;
            inv.server.data = Some(ep);
            inv.server.disconnect = disconnect;
        }
        None => {}
    }
    if let Some(k) = &key {
        inv.key = Some(parse_key(k)?);
        inv.server.file_key = true;
    }
    if let Some(p) = &pid {
        let o = Opts::parse("pid", p, &["file", "fd"])?;
        inv.pid_file = Some(match (o.str("file"), o.int("fd")?) {
            (Some(f), _) => PathBuf::from(f),
            (None, Some(fd)) => fd_path("pid", fd)?,
            (None, None) => return Err(cfg_err("--pid: file= or fd= is required")),
        });
    }
    if let Some(l) = &locality {
        let o = Opts::parse("locality", l, &["reject-locality-4", "allow-set-locality"])?;
        inv.server.locality = LocalityOptions {
            allow_set_locality: o.bool("allow-set-locality"),
            reject_locality_4: o.bool("reject-locality-4"),
        };
    }
    inv.state = match (&tpmstate, env("TPM_PATH")) {
        (Some(t), _) => Some(parse_tpmstate(t)?),
        (None, Some(dir)) if !dir.is_empty() => Some(StateSpec { dir: PathBuf::from(dir), mode: None }),
        _ => return Err(cfg_err("--tpmstate dir=<dir> (or the TPM_PATH environment variable) is required")),
    };
    if let Some(s) = &seccomp {
        let o = Opts::parse("seccomp", s, &["action"])?;
        match o.str("action").unwrap_or("kill") {
            "none" | "kill" | "log" => log::debug!("--seccomp {s}: accepted and ignored"),
            a => return Err(cfg_err(format!("--seccomp: unsupported action '{a}'"))),
        }
    }
    if let Some(f) = &flags {
        parse_flags(f, &mut inv.server, inv.tpm_version)?;
    }
    if inv.server.data.is_none() && inv.server.ctrl.is_none() {
        return Err(cfg_err("no channel: give --server (or -p) and/or --ctrl"));
    }
    Ok(inv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(args: &[&str]) -> Result<SwtpmInvocation> {
        let v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        parse_with_env(&v, &no_env)
    }

    fn err(args: &[&str]) -> String {
        match parse(args) {
            Ok(inv) => panic!("{args:?} parsed: {inv:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn tcp(port: u16) -> Endpoint {
        Endpoint::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    }

    #[test]
    fn qemu_style_tcp_invocation() {
        let inv = parse(&[
            "socket",
            "--tpm2",
            "--tpmstate",
            "dir=/var/lib/tpm,mode=0600",
            "--server",
            "type=tcp,port=2321",
            "--ctrl",
            "type=tcp,port=2322",
            "--flags",
            "not-need-init,startup-clear",
        ])
        .expect("parses");
        assert!(inv.print_and_exit.is_none());
        assert_eq!(inv.tpm_version, TpmVersion::V2_0);
        assert_eq!(inv.state, Some(StateSpec { dir: "/var/lib/tpm".into(), mode: Some(0o600) }));
        assert_eq!(inv.server.data, Some(tcp(2321)));
        assert_eq!(inv.server.ctrl, Some(tcp(2322)));
        assert!(inv.server.not_need_init);
        assert_eq!(inv.server.startup, Some(StartupType::Clear));
        assert!(!inv.server.disconnect);
        assert!(!inv.server.file_key);
        assert_eq!(inv.key, None);
    }

    #[test]
    fn unixio_channels_bindaddr_and_equals_form() {
        let inv = parse(&[
            "socket",
            "--tpmstate=dir=/s",
            "--server",
            "type=unixio,path=/run/tpm.data,mode=0600,uid=0,gid=root",
            "--ctrl=type=unixio,path=/run/tpm.ctrl,terminate",
        ])
        .expect("parses");
        assert_eq!(inv.tpm_version, TpmVersion::V1_2, "swtpm's default");
        assert_eq!(
            inv.server.data,
            Some(Endpoint::Unix { path: "/run/tpm.data".into(), mode: Some(0o600), uid: Some(0), gid: Some(0) })
        );
        assert_eq!(
            inv.server.ctrl,
            Some(Endpoint::Unix { path: "/run/tpm.ctrl".into(), mode: Some(0o770), uid: None, gid: None })
        );
        assert!(inv.server.terminate_on_ctrl_disconnect);
        let inv = parse(&[
            "socket",
            "--tpmstate",
            "backend-uri=dir:///s",
            "--server",
            "port=7000,bindaddr=::1,disconnect",
            "--ctrl",
            "type=tcp,port=7001,bindaddr=0.0.0.0",
        ])
        .expect("parses");
        assert_eq!(inv.state.map(|s| s.dir), Some(PathBuf::from("/s")));
        assert_eq!(inv.server.data, Some(Endpoint::Tcp("[::1]:7000".parse().expect("addr"))));
        assert!(inv.server.disconnect);
        assert_eq!(inv.server.ctrl, Some(Endpoint::Tcp("0.0.0.0:7001".parse().expect("addr"))));
    }

    #[test]
    fn port_option_means_tcp_with_disconnect_and_env_is_honoured() {
        for args in [
            &["socket", "--tpmstate", "dir=/s", "-p", "6545"][..],
            &["socket", "--tpmstate", "dir=/s", "-p6545"],
            &["socket", "--tpmstate", "dir=/s", "--port", "6545"],
            &["socket", "--tpmstate", "dir=/s", "--port=6545"],
        ] {
            let inv = parse(args).expect("parses");
            assert_eq!(inv.server.data, Some(tcp(6545)), "{args:?}");
            assert!(inv.server.disconnect, "{args:?}");
        }
        // The last of -p and --server wins, as in swtpm.
        let inv = parse(&["socket", "--tpmstate", "dir=/s", "-p", "1", "--server", "port=2"]).expect("parses");
        assert_eq!(inv.server.data, Some(tcp(2)));
        assert!(!inv.server.disconnect);
        let env = |k: &str| match k {
            "TPM_PORT" => Some("4444".to_string()),
            "TPM_PATH" => Some("/from/env".to_string()),
            _ => None,
        };
        let args: Vec<String> = ["socket", "--server", "type=tcp"].iter().map(|s| s.to_string()).collect();
        let inv = parse_with_env(&args, &env).expect("parses");
        assert_eq!(inv.server.data, Some(tcp(4444)));
        assert_eq!(inv.state.map(|s| s.dir), Some(PathBuf::from("/from/env")));
        assert!(err(&["socket", "--tpmstate", "dir=/s", "--server", "type=tcp"]).contains("TPM_PORT"));
    }

    #[test]
    fn flags_locality_key_log_pid_terminate_seccomp() {
        let dir = std::env::temp_dir().join(format!("xvtpm-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let keyfile = dir.join("key");
        std::fs::write(&keyfile, "0x00112233445566778899aabbccddeeff\n").expect("key");
        let keyarg = format!("file={},mode=aes-cbc,format=hex,remove=true", keyfile.display());
        let inv = parse(&[
            "socket",
            "--tpm2",
            "--tpmstate",
            "dir=/s",
            "--ctrl",
            "type=tcp,port=1",
            "--flags",
            "startup-state",
            "--locality",
            "allow-set-locality,reject-locality-4",
            "--key",
            &keyarg,
            "--log",
            "file=/tmp/l,prefix=x: ,truncate",
            "--pid",
            "file=/run/p.pid",
            "-t",
            "--seccomp",
            "action=none",
            "--runas",
            &current_uid().expect("uid").to_string(),
        ])
        .expect("parses");
        assert_eq!(inv.server.startup, Some(StartupType::State));
        assert!(inv.server.not_need_init, "a startup flag implies not-need-init");
        assert_eq!(inv.server.locality, LocalityOptions { allow_set_locality: true, reject_locality_4: true });
        let key = inv.key.expect("key");
        assert_eq!(key.source, KeySource::File(keyfile.clone()));
        assert_eq!(
            (key.format, key.mode, key.remove, key.kdf),
            (KeyFormat::Hex, KeyMode::Aes128Cbc, true, Kdf::Pbkdf2)
        );
        assert_eq!(key.read_key().expect("key reads"), (0..16).map(|i| i * 0x11).collect::<Vec<u8>>());
        assert!(inv.server.file_key);
        assert_eq!(
            inv.log,
            Some(LogSpec {
                file: Some("/tmp/l".into()),
                fd: None,
                level: 1,
                prefix: Some("x: ".into()),
                truncate: true
            })
        );
        assert_eq!(inv.pid_file, Some(PathBuf::from("/run/p.pid")));
        assert!(inv.server.terminate_on_data_disconnect);

        // Binary and 256-bit keys; lengths must match the mode.
        std::fs::write(&keyfile, [7u8; 32]).expect("key");
        let k = parse_key(&format!("file={},format=binary,mode=aes-256-cbc", keyfile.display())).expect("spec");
        assert_eq!(k.read_key().expect("reads"), vec![7u8; 32]);
        let k = parse_key(&format!("file={},format=binary", keyfile.display())).expect("spec");
        assert!(k.read_key().is_err(), "32 bytes for a 128-bit mode");
        std::fs::write(&keyfile, "00112233").expect("key");
        assert!(parse_key(&format!("file={}", keyfile.display())).expect("spec").read_key().is_err());
        std::fs::write(&keyfile, "zz112233445566778899aabbccddeeff").expect("key");
        assert!(parse_key(&format!("file={}", keyfile.display())).expect("spec").read_key().is_err());
        let k = parse_key("pwdfd=5,kdf=sha512").expect("spec");
        assert_eq!((k.source, k.kdf), (KeySource::Passphrase("/proc/self/fd/5".into()), Kdf::Sha512));
        assert!(parse_key("pwdfile=/p").expect("spec").read_key().is_err(), "not a key file");
        assert_eq!(parse_key("fd=9").expect("spec").source, KeySource::File("/proc/self/fd/9".into()));
        let _ = std::fs::remove_dir_all(&dir);

        let log = parse_log("fd=3,level=20").expect("log");
        assert_eq!((log.fd, log.level), (Some(3), 20));
        let inv = parse(&["socket", "--tpmstate", "dir=/s", "-p", "1", "--pid", "fd=4"]).expect("parses");
        assert_eq!(inv.pid_file, Some(PathBuf::from("/proc/self/fd/4")));
        // startup-none alone keeps swtpm's default of waiting for CMD_INIT.
        let inv = parse(&["socket", "--tpmstate", "dir=/s", "-p", "1", "--flags", "startup-none"]).expect("parses");
        assert!(!inv.server.not_need_init);
        assert_eq!(inv.server.startup, None);
        let inv =
            parse(&["socket", "--tpmstate", "dir=/s", "-p", "1", "--flags", "startup-deactivated"]).expect("TPM 1.2");
        assert_eq!(inv.server.startup, Some(StartupType::Deactivated));
    }

    #[test]
    fn poll_option() {
        let base = ["socket", "--tpmstate", "dir=/s", "-p", "1"];
        let inv = parse(&base).expect("parses");
        assert_eq!(inv.server.poll, std::time::Duration::from_micros(50));
        let inv = parse(&[&base[..], &["--poll-us", "0"]].concat()).expect("parses");
        assert!(inv.server.poll.is_zero());
        let inv = parse(&[&base[..], &["--poll-us=200"]].concat()).expect("parses");
        assert_eq!(inv.server.poll, std::time::Duration::from_micros(200));
        for bad in ["-1", "x", "2000000"] {
            let e = parse(&[&base[..], &["--poll-us", bad]].concat()).expect_err("refused").to_string();
            assert!(e.contains("--poll-us"), "{e}");
        }
    }

    #[test]
    fn print_version_help_and_capabilities() {
        let caps = parse(&["socket", "--print-capabilities"]).expect("parses").print_and_exit.expect("text");
        // What libvirt reads: swtpm's fields (libvirt parses the JSON; the spacing is not kept).
        let v: serde_json::Value = serde_json::from_str(&caps).expect("JSON");
        assert_eq!((v["type"].as_str(), v["version"].as_str()), (Some("swtpm"), Some("0.7.1")), "{caps}");
        let features: Vec<&str> =
            v["features"].as_array().expect("features").iter().filter_map(|f| f.as_str()).collect();
        assert_eq!(features[..2], ["tpm-1.2", "tpm-2.0"], "{caps}");
        assert!(features.contains(&"tpm-send-command-header"), "{caps}");
        assert!(!features.contains(&"cmdarg-pwd-fd") && !features.contains(&"cmdarg-migration"), "{caps}");
        assert!(parse(&["--version"])
            .expect("parses")
            .print_and_exit
            .expect("text")
            .starts_with("TPM emulator version"));
        assert!(parse(&["socket", "--version"]).expect("parses").print_and_exit.is_some());
        assert!(parse(&["socket", "-h"]).expect("parses").print_and_exit.expect("text").contains("--tpmstate"));
        assert!(parse(&["--help"]).expect("parses").print_and_exit.is_some());
    }

    #[test]
    fn errors_name_the_problem() {
        let base = ["socket", "--tpmstate", "dir=/s", "--server", "port=1"];
        let with = |extra: &[&str]| {
            let mut a = base.to_vec();
            a.extend_from_slice(extra);
            err(&a)
        };
        assert!(with(&["--bogus"]).contains("unknown option '--bogus'"));
        assert!(with(&["stray"]).contains("unknown parameter 'stray'"));
        assert!(with(&["--tpm2=yes"]).contains("takes no value"));
        assert!(with(&["--ctrl"]).contains("needs a value"));
        assert!(with(&["-d"]).contains("--daemon is not supported"));
        assert!(with(&["--daemon"]).contains("--daemon is not supported"));
        assert!(with(&["-f", "3"]).contains("--fd is not supported"));
        assert!(with(&["--migration-key", "file=/k"]).contains("--migration-key"));
        assert!(with(&["--print-states"]).contains("not supported"));
        assert!(with(&["--ctrl", "port=1"]).contains("missing type"));
        assert!(with(&["--ctrl", "type=tcp"]).contains("needs port"));
        assert!(with(&["--ctrl", "type=unixio"]).contains("needs path"));
        assert!(with(&["--ctrl", "type=udp,port=1"]).contains("unsupported control channel type 'udp'"));
        assert!(with(&["--ctrl", "type=tcp,port=1,fd=3"]).contains("fd= is not supported"));
        assert!(with(&["--ctrl", "type=tcp,port=1,colour=red"]).contains("unknown option 'colour=red'"));
        assert!(with(&["--ctrl", "type=tcp,port=70000"]).contains("outside the valid range"));
        assert!(with(&["--ctrl", "type=tcp,port=1,bindaddr=localhost"]).contains("bind address"));
        assert!(with(&["--ctrl", "type=tcp,port=x"]).contains("invalid number 'x'"));
        assert!(with(&["--ctrl", "type=unixio,path=/p,mode=999"]).contains("invalid mode"));
        assert!(with(&["--ctrl", "type=unixio,path=/p,uid=no-such-user-here"]).contains("does not exist"));
        assert!(with(&["-p", "port"]).contains("cannot parse socket port number"));
        assert!(with(&["-p", "65536"]).contains("outside the valid range"));
        assert!(with(&["--key", "mode=aes-cbc"]).contains("is required"));
        assert!(with(&["--key", "file=/k,mode=des"]).contains("unknown encryption mode 'des'"));
        assert!(with(&["--key", "file=/k,format=pem"]).contains("unknown key format 'pem'"));
        assert!(with(&["--key", "pwdfile=/k,kdf=md5"]).contains("unknown kdf 'md5'"));
        assert!(with(&["--pid", "x=1"]).contains("unknown option 'x=1'"));
        assert!(with(&["--pid", "fd=-2"]).contains("bad file descriptor"));
        assert!(with(&["--flags", "startup-bogus"]).contains("unknown option 'startup-bogus'"));
        assert!(with(&["--tpm2", "--flags", "startup-deactivated"]).contains("startup-deactivated"));
        assert!(with(&["--locality", "allow-everything"]).contains("unknown option"));
        assert!(with(&["--seccomp", "action=trap"]).contains("unsupported action 'trap'"));
        assert!(with(&["--runas", "no-such-user-here"]).contains("does not exist"));
        assert!(with(&["--log", "level=x"]).contains("invalid number"));
        assert!(with(&["--server", "type=unixio,fd=3"]).contains("fd= is not supported"));
        assert!(with(&["--server", "type=udp"]).contains("unsupported socket type 'udp'"));
        assert!(with(&["--server", "port=1,ifname=eth0"]).contains("ifname= is not supported"));
        assert!(err(&["socket", "--server", "port=1"]).contains("--tpmstate"));
        assert!(err(&["socket", "--tpmstate", "dir=/s"]).contains("no channel"));
        assert!(err(&["socket", "--tpmstate", "mode=0600", "-p", "1"]).contains("dir= or backend-uri="));
        assert!(err(&["socket", "--tpmstate", "backend-uri=file:///x", "-p", "1"]).contains("only dir://"));
        assert!(err(&["chardev"]).contains("not supported"));
        assert!(err(&["frobnicate"]).contains("unknown swtpm interface"));
        assert!(err(&[]).contains("missing"));
        // Changing users needs privileges we do not use.
        if current_uid() == Some(0) {
            assert!(with(&["--runas", "65534"]).contains("changing the user is not supported"));
        } else {
            assert!(with(&["--runas", "0"]).contains("changing the user is not supported"));
        }
    }

    #[test]
    fn suboption_semantics_follow_swtpm() {
        let o = Opts::parse("x", "a,b=false,c=1,,a=false", &["a", "b", "c"]).expect("parses");
        assert!(o.bool("a"), "first occurrence wins");
        assert!(!o.bool("b"));
        assert!(o.bool("c"));
        assert!(Opts::parse("x", "a=", &["a"]).is_err(), "an empty value is not an option");
        assert!(Opts::parse("x", "ab", &["a"]).is_err());
    }

    #[test]
    fn pid_file_is_written() {
        let p = std::env::temp_dir().join(format!("xvtpm-pid-{}", std::process::id()));
        write_pid_file(&p).expect("writes");
        assert_eq!(std::fs::read_to_string(&p).expect("reads"), std::process::id().to_string());
        let _ = std::fs::remove_file(&p);
        assert!(write_pid_file(Path::new("/nonexistent-dir/x.pid")).is_err());
    }
}
