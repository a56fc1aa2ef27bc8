//! Debian's swtpm as a process with Unix data and control sockets: the hardware TPM of the
//! manager's tests and the peer of the driver's.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running swtpm, killed on drop.
#[derive(Debug)]
pub struct SwtpmProcess {
    child: Child,
    /// Its data socket.
    pub data: PathBuf,
    /// Its control socket.
    pub ctrl: PathBuf,
}

impl Drop for SwtpmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl SwtpmProcess {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts a swtpm (TPM 2.0 if `tpm2`, else 1.2) with its state in `dir/state`, powered on
    /// (`not-need-init`), and waits for its sockets.
    pub fn start(dir: &Path, tpm2: bool) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir.join("state"))?;
        let (data, ctrl) = (dir.join("data.sock"), dir.join("ctrl.sock"));
        let mut cmd = Command::new("swtpm");
        cmd.arg("socket");
        if tpm2 {
            cmd.arg("--tpm2");
        }
        let child = cmd
            .args(["--flags", "not-need-init", "--tpmstate"])
            .arg(format!("dir={}", dir.join("state").display()))
            .arg("--server")
            .arg(format!("type=unixio,path={}", data.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", ctrl.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut p = SwtpmProcess { child, data, ctrl };
        // A socket file exists from bind(), before listen(): only a connection that succeeds
        // says swtpm is ready (a bare existence check lost that race in CI).
        let end = Instant::now() + Duration::from_secs(20);
        while !(UnixStream::connect(&p.ctrl).is_ok() && UnixStream::connect(&p.data).is_ok()) {
            if let Some(status) = p.child.try_wait()? {
                return Err(std::io::Error::other(format!("swtpm exited at start: {status}")));
            }
            if Instant::now() > end {
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "swtpm's sockets accept no connection"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(p)
    }
}
