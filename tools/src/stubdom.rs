//! `xvtpm stubdom`: the files of the stub-domain deployment. The manager's domain (its store
//! disk and domain file) and one vTPM domain per guest (its disk, which carries the vTPM's
//! identity, and its domain file), and the guest's `vtpm=` line. The images themselves come
//! from `tools/stubdom/build-images.sh`.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use xvtpm_vtpmmgr::uuid_str;

use crate::admin::uuid_arg;

#[derive(Subcommand, Debug)]
pub enum StubdomCmd {
    /// Set up the manager's domain: its store disk (a sparse file) and its domain file. Start it
    /// the first time with `xl create FILE 'extra="console=hvc0 xvtpm.init"'` (makes the store),
    /// later with plain `xl create FILE`.
    Manager(ManagerArgs),
    /// Set up one guest's vTPM domain: its disk (ext4 holding the vTPM's uuid, TPM version and
    /// state; the TPM is manufactured at the domain's first start) and its domain file. Prints
    /// the `vtpm=` line for the guest's domain file.
    Vtpm(VtpmArgs),
}

#[derive(Args, Debug)]
pub struct ImageArgs {
    /// Where build-images.sh's images are installed.
    #[arg(long, value_name = "DIR", default_value = "/usr/lib/xvtpm")]
    images: PathBuf,
    /// The domain's kernel (default: vmlinuz in --images).
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// The domain's memory in MiB. The Debian kernel alone needs ~60 MiB to be loaded.
    #[arg(long, default_value_t = 128)]
    memory: u32,
    /// Size of the disk to create, in MiB.
    #[arg(long, default_value_t = 16)]
    disk_size: u64,
    /// Print what was made as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct ManagerArgs {
    /// The domain's name (what vTPM domains name as their vtpm backend).
    #[arg(long, default_value = "vtpmmgr")]
    name: String,
    /// The store's disk (default: /var/lib/xvtpm/NAME.img). Never overwritten.
    #[arg(long, value_name = "FILE")]
    disk: Option<PathBuf>,
    /// The domain file to write (default: /etc/xen/NAME.cfg). Never overwritten.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The hardware TPM's MMIO pages given to the domain (iomem=): its five locality pages.
    #[arg(long, default_value = "fed40,5")]
    iomem: String,
    /// Provision unknown vTPM domains into group 0 instead of refusing them.
    #[arg(long)]
    auto_provision: bool,
    #[command(flatten)]
    image: ImageArgs,
}

#[derive(Args, Debug)]
pub struct VtpmArgs {
    /// The domain's name (what the guest's vtpm line names as backend), e.g. vtpm-GUEST.
    #[arg(long)]
    name: String,
    /// The manager domain's name.
    #[arg(long, default_value = "vtpmmgr")]
    manager: String,
    /// The uuid of the guest's vTPM (the guest's `vtpm=` line; default: a new random one).
    #[arg(long)]
    uuid: Option<String>,
    /// The uuid of this vTPM domain at the manager: its own `vtpm=` line, as provisioned with
    /// `xvtpm vtpm provision` (default: a new random one).
    #[arg(long)]
    vtpm_uuid: Option<String>,
    /// A TPM 1.2 instead of a TPM 2.0.
    #[arg(long = "tpm1.2")]
    tpm12: bool,
    /// The domain's disk (default: /var/lib/xvtpm/NAME.img). Never overwritten.
    #[arg(long, value_name = "FILE")]
    disk: Option<PathBuf>,
    /// The domain file to write (default: /etc/xen/NAME.cfg). Never overwritten.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    image: ImageArgs,
}

pub fn run(cmd: StubdomCmd) -> anyhow::Result<()> {
    match cmd {
        StubdomCmd::Manager(a) => manager(a),
        StubdomCmd::Vtpm(a) => vtpm(a),
    }
}

fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !ok {
        bail!("domain name {name:?}: use letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

fn default_path(p: Option<PathBuf>, dir: &str, name: &str, ext: &str) -> PathBuf {
    p.unwrap_or_else(|| Path::new(dir).join(format!("{name}.{ext}")))
}

/// Creates `path` (and its directory); refuses an existing file, so nothing is overwritten.
fn create_new(path: &Path) -> anyhow::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    OpenOptions::new().write(true).create_new(true).open(path).with_context(|| format!("create {}", path.display()))
}

fn uuid_or_random(u: Option<&str>) -> anyhow::Result<[u8; 16]> {
    u.map_or_else(|| Ok(xvtpm_proto::Uuid::from_random(rand::random()).0), uuid_arg)
}

/// The domain file of a stub domain: PV, our kernel and initramfs, one disk.
fn domain_file(name: &str, image: &ImageArgs, ramdisk: &str, disk: &Path, extra: &str, more: &[String]) -> String {
    let kernel = image.kernel.clone().unwrap_or_else(|| image.images.join("vmlinuz"));
    let mut s = format!(
        "# Written by `xvtpm stubdom`.\nname = \"{name}\"\ntype = \"pv\"\nkernel = \"{}\"\nramdisk = \"{}\"\n\
         extra = \"{extra}\"\nmemory = {}\nvcpus = 1\ndisk = [ \"{},raw,xvda,w\" ]\n",
        kernel.display(),
        image.images.join(ramdisk).display(),
        image.memory,
        disk.display()
    );
    for m in more {
        s.push_str(m);
        s.push('\n');
    }
    s.push_str("on_crash = \"preserve\"\n");
    s
}

fn write_config(path: &Path, text: &str) -> anyhow::Result<()> {
    create_new(path)?.write_all(text.as_bytes()).with_context(|| format!("write {}", path.display()))
}

fn manager(a: ManagerArgs) -> anyhow::Result<()> {
    check_name(&a.name)?;
    let disk = default_path(a.disk, "/var/lib/xvtpm", &a.name, "img");
    let config = default_path(a.config, "/etc/xen", &a.name, "cfg");
    if config.exists() {
        bail!("{} exists; not overwritten", config.display());
    }
    // A sparse file: the store grows into it. Its blocks read as zeros until written.
    let f = create_new(&disk)?;
    f.set_len(a.image.disk_size << 20).with_context(|| format!("size {}", disk.display()))?;
    drop(f);
    let extra = if a.auto_provision { "console=hvc0 xvtpm.auto-provision" } else { "console=hvc0" };
    let text = domain_file(
        &a.name,
        &a.image,
        "vtpmmgr-stubdom.cpio.xz",
        &disk,
        extra,
        &[format!("iomem = [ \"{}\" ]", a.iomem)],
    );
    write_config(&config, &text)?;
    if a.image.json {
        let j = serde_json::json!({
            "name": a.name,
            "config": config.display().to_string(),
            "disk": disk.display().to_string(),
        });
        outln!("{j}");
    } else {
        outln!("manager domain {}: {} (store disk {})", a.name, config.display(), disk.display());
        outln!("first start (creates the store): xl create {} 'extra=\"{extra} xvtpm.init\"'", config.display());
        outln!("later starts: xl create {}", config.display());
        if !a.auto_provision {
            outln!("it takes management commands from dom0: xvtpm vtpm|group ... --manager-domain {}", a.name);
        }
    }
    Ok(())
}

fn vtpm(a: VtpmArgs) -> anyhow::Result<()> {
    check_name(&a.name)?;
    check_name(&a.manager)?;
    let guest_uuid = uuid_str(&uuid_or_random(a.uuid.as_deref())?);
    let vtpm_uuid = uuid_str(&uuid_or_random(a.vtpm_uuid.as_deref())?);
    let disk = default_path(a.disk, "/var/lib/xvtpm", &a.name, "img");
    let config = default_path(a.config, "/etc/xen", &a.name, "cfg");
    for p in [&disk, &config] {
        if p.exists() {
            bail!("{} exists; not overwritten", p.display());
        }
    }
    // The disk's first contents: who it serves, and the request to manufacture its TPM at the
    // first start (the domain removes it once done).
    let staging = std::env::temp_dir().join(format!("xvtpm-disk-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).with_context(|| format!("create {}", staging.display()))?;
    let version = if a.tpm12 { "1.2" } else { "2.0" };
    let made = fs::write(staging.join("xvtpm.conf"), format!("uuid={guest_uuid}\ntpm={version}\n"))
        .and_then(|()| fs::write(staging.join("create"), b""))
        .context("write the disk's files")
        .and_then(|()| mkfs(&staging, &disk, a.image.disk_size));
    let _ = fs::remove_dir_all(&staging);
    made?;
    let line = format!("vtpm = [ \"backend={},uuid={guest_uuid}\" ]", a.name);
    let text = domain_file(
        &a.name,
        &a.image,
        "vtpm-stubdom.cpio.xz",
        &disk,
        "console=hvc0",
        &[format!("vtpm = [ \"backend={},uuid={vtpm_uuid}\" ]", a.manager)],
    );
    write_config(&config, &text)?;
    if a.image.json {
        let j = serde_json::json!({
            "name": a.name,
            "config": config.display().to_string(),
            "disk": disk.display().to_string(),
            "uuid": guest_uuid.to_string(),
            "vtpm_uuid": vtpm_uuid.to_string(),
            "tpm": version.to_string(),
            "guest_line": line,
        });
        outln!("{j}");
    } else {
        outln!("vTPM domain {}: {} (disk {}, TPM {version})", a.name, config.display(), disk.display());
        outln!(
            "its identity at the manager: {vtpm_uuid}; before its first start: \
             xvtpm vtpm provision --manager-domain {} --uuid {vtpm_uuid}",
            a.manager
        );
        outln!("for the guest's domain file:\n{line}");
    }
    Ok(())
}

/// An ext4 file system in a new file, holding `dir`'s files (e2fsprogs' mkfs.ext4 -d).
fn mkfs(dir: &Path, disk: &Path, size_mib: u64) -> anyhow::Result<()> {
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "xvtpm", "-d"])
        .arg(dir)
        .arg(disk)
        .arg(format!("{size_mib}M"))
        .output()
        .context("run mkfs.ext4 (apt-get install e2fsprogs)")?;
    if !out.status.success() {
        let _ = fs::remove_file(disk);
        bail!("mkfs.ext4 {} failed: {}", disk.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
