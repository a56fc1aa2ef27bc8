//! A minimal TPM 2.0 client for tests and benchmarks: builders for the handful of commands
//! they use and a transport over swtpm's TCP data channel. The same bytes go to our vtpm and to
//! Debian's swtpm, so comparisons are fair.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use xvtpm_proto::tpm::{self, Family, TPM_ST_NO_SESSIONS, TPM_ST_SESSIONS};

const TPM_RH_OWNER: u32 = 0x4000_0001;
const TPM_RS_PW: u32 = 0x4000_0009;
const TPM_ALG_SHA256: u16 = 0x000b;
const TPM_ALG_NULL: u16 = 0x0010;

fn command(tag: u16, cc: u32, handles: &[u32], params: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    for h in handles {
        body.extend_from_slice(&h.to_be_bytes());
    }
    if tag == TPM_ST_SESSIONS {
        // One empty password session.
        let session = [TPM_RS_PW.to_be_bytes().as_slice(), &[0, 0], &[0], &[0, 0]].concat();
        body.extend_from_slice(&(session.len() as u32).to_be_bytes());
        body.extend_from_slice(&session);
    }
    body.extend_from_slice(params);
    tpm::frame(tag, cc, &body)
}

fn tpm2b(data: &[u8]) -> Vec<u8> {
    [&(data.len() as u16).to_be_bytes()[..], data].concat()
}

/// TPM2_Startup(CLEAR).
pub fn startup_clear() -> Vec<u8> {
    tpm::startup(Family::Tpm20, tpm::StartupType::Clear).unwrap_or_default()
}

/// TPM2_GetRandom(n).
pub fn get_random(n: u16) -> Vec<u8> {
    tpm::get_random(Family::Tpm20, n)
}

/// TPM2_PCR_Read of PCRs 0-7 in the SHA-256 bank.
pub fn pcr_read_sha256_0_7() -> Vec<u8> {
    let sel = [&1u32.to_be_bytes()[..], &TPM_ALG_SHA256.to_be_bytes(), &[3, 0xff, 0, 0]].concat();
    command(TPM_ST_NO_SESSIONS, 0x17e, &[], &sel)
}

/// TPM2_PCR_Extend of `pcr` in the SHA-256 bank with `digest`, password session.
pub fn pcr_extend_sha256(pcr: u32, digest: &[u8; 32]) -> Vec<u8> {
    let p = [&1u32.to_be_bytes()[..], &TPM_ALG_SHA256.to_be_bytes(), digest].concat();
    command(TPM_ST_SESSIONS, 0x182, &[pcr], &p)
}

/// TPM2_CreatePrimary of an ECC P-256 storage key under the owner hierarchy.
pub fn create_primary_ecc_p256() -> Vec<u8> {
    let sensitive = tpm2b(&[0, 0, 0, 0]);
    let public = [
        &0x0023u16.to_be_bytes()[..],  // TPM_ALG_ECC
        &TPM_ALG_SHA256.to_be_bytes(), // nameAlg
        &0x0003_0072u32.to_be_bytes(), // fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|restricted|decrypt
        &[0, 0],                       // authPolicy
        &0x0006u16.to_be_bytes(),      // AES
        &128u16.to_be_bytes(),         // 128 bits
        &0x0043u16.to_be_bytes(),      // CFB
        &TPM_ALG_NULL.to_be_bytes(),   // scheme
        &0x0003u16.to_be_bytes(),      // NIST P-256
        &TPM_ALG_NULL.to_be_bytes(),   // kdf
        &[0, 0, 0, 0],                 // unique x, y
    ]
    .concat();
    let params = [sensitive, tpm2b(&public), vec![0, 0], 0u32.to_be_bytes().to_vec()].concat();
    command(TPM_ST_SESSIONS, 0x131, &[TPM_RH_OWNER], &params)
}

/// TPM2_ReadPublic(handle): succeeds only while the object is loaded.
pub fn read_public(handle: u32) -> Vec<u8> {
    command(TPM_ST_NO_SESSIONS, 0x173, &[handle], &[])
}

/// TPM2_PCR_Read of one PCR in the SHA-256 bank.
pub fn pcr_read_sha256(pcr: u32) -> Vec<u8> {
    let mut bits = [0u8; 3];
    bits[(pcr / 8) as usize % 3] = 1 << (pcr % 8);
    let sel = [&1u32.to_be_bytes()[..], &TPM_ALG_SHA256.to_be_bytes(), &[3], &bits].concat();
    command(TPM_ST_NO_SESSIONS, 0x17e, &[], &sel)
}

/// TPM2_FlushContext(handle).
pub fn flush_context(handle: u32) -> Vec<u8> {
    command(TPM_ST_NO_SESSIONS, 0x165, &[], &handle.to_be_bytes())
}

/// TPM2_NV_DefineSpace of an owner-read/write index of `size` bytes.
pub fn nv_define(index: u32, size: u16) -> Vec<u8> {
    let public = [
        &index.to_be_bytes()[..],
        &TPM_ALG_SHA256.to_be_bytes(),
        &0x0002_0002u32.to_be_bytes(), // OWNERWRITE | OWNERREAD
        &[0, 0],
        &size.to_be_bytes(),
    ]
    .concat();
    let params = [tpm2b(&[]), tpm2b(&public)].concat();
    command(TPM_ST_SESSIONS, 0x12a, &[TPM_RH_OWNER], &params)
}

/// TPM2_NV_Write of `data` at offset 0, owner authorised.
pub fn nv_write(index: u32, data: &[u8]) -> Vec<u8> {
    let params = [tpm2b(data), vec![0, 0]].concat();
    command(TPM_ST_SESSIONS, 0x137, &[TPM_RH_OWNER, index], &params)
}

/// TPM2_NV_Read of `size` bytes at offset 0, owner authorised.
pub fn nv_read(index: u32, size: u16) -> Vec<u8> {
    let params = [size.to_be_bytes(), 0u16.to_be_bytes()].concat();
    command(TPM_ST_SESSIONS, 0x14e, &[TPM_RH_OWNER, index], &params)
}

/// TPM2_HierarchyChangeAuth(owner) with a password session holding `old`, setting `new`.
pub fn change_owner_auth(old: &[u8], new: &[u8]) -> Vec<u8> {
    let mut session = TPM_RS_PW.to_be_bytes().to_vec();
    session.extend_from_slice(&[0, 0, 0]);
    session.extend_from_slice(&tpm2b(old));
    let mut body = TPM_RH_OWNER.to_be_bytes().to_vec();
    body.extend_from_slice(&(session.len() as u32).to_be_bytes());
    body.extend_from_slice(&session);
    body.extend_from_slice(&tpm2b(new));
    let mut cmd = TPM_ST_SESSIONS.to_be_bytes().to_vec();
    cmd.extend_from_slice(&((10 + body.len()) as u32).to_be_bytes());
    cmd.extend_from_slice(&0x0000_0129u32.to_be_bytes());
    cmd.extend_from_slice(&body);
    cmd
}

/// The response code of a response.
pub fn rc(rsp: &[u8]) -> u32 {
    tpm::code(rsp).unwrap_or(u32::MAX)
}

/// The object handle a successful CreatePrimary returned.
pub fn created_handle(rsp: &[u8]) -> Option<u32> {
    tpm::be32(rsp, 10)
}

/// The data of a successful NV_Read response (sessions tag: parameterSize, then TPM2B).
pub fn nv_read_data(rsp: &[u8]) -> Option<&[u8]> {
    let n = u16::from_be_bytes([*rsp.get(14)?, *rsp.get(15)?]) as usize;
    rsp.get(16..16 + n)
}

/// swtpm's data channel over TCP.
#[derive(Debug)]
pub struct TcpTpm {
    stream: TcpStream,
}

impl TcpTpm {
    /// Connects to `port` on the loopback.
    pub fn connect(port: u16) -> std::io::Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(TcpTpm { stream })
    }

    /// Sends a command, returns the response.
    pub fn transmit(&mut self, cmd: &[u8]) -> std::io::Result<Vec<u8>> {
        self.stream.write_all(cmd)?;
        let mut hdr = [0u8; 10];
        self.stream.read_exact(&mut hdr)?;
        let size = u32::from_be_bytes([hdr[2], hdr[3], hdr[4], hdr[5]]) as usize;
        if !(10..=65536).contains(&size) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("response size {size}")));
        }
        let mut rsp = hdr.to_vec();
        rsp.resize(size, 0);
        self.stream.read_exact(&mut rsp[10..])?;
        Ok(rsp)
    }
}

/// Starts `cmd` (swtpm, or one of ours taking swtpm's command line, possibly behind `taskset`)
/// in socket mode: TPM 2.0, state in `state` (made if missing), data and control channels on
/// two free TCP ports, started and powered on; returns once it answers a GetRandom, with its
/// data port. A server that exits or does not answer within `timeout` is an error (and killed).
pub fn start_socket_server(
    mut cmd: std::process::Command,
    state: &std::path::Path,
    stderr: std::process::Stdio,
    timeout: Duration,
) -> anyhow::Result<(std::process::Child, u16)> {
    std::fs::create_dir_all(state)?;
    let port = crate::free_port_pair()?;
    let mut child = cmd
        .arg("socket")
        .arg("--tpm2")
        .args(["--server", &format!("type=tcp,port={port}")])
        .args(["--ctrl", &format!("type=tcp,port={}", port + 1)])
        .arg("--tpmstate")
        .arg(format!("dir={}", state.display()))
        .args(["--flags", "not-need-init,startup-clear"])
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()?;
    let end = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < end {
        if let Some(st) = child.try_wait()? {
            anyhow::bail!("exited ({st}) on port {port}");
        }
        if let Ok(mut t) = TcpTpm::connect(port) {
            // Startup was sent by the server (startup-clear); make sure it answers.
            t.transmit(&get_random(8))?;
            return Ok((child, port));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    anyhow::bail!("did not start on port {port} within {timeout:?}")
}
