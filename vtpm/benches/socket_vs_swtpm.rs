//! Our socket mode against Debian's swtpm, same client, same run: median latency of small
//! TPM 2.0 commands over the TCP data channel, CreatePrimary(ECC P-256), the server's CPU per
//! command for a client sending back to back and for one pausing 1 ms between commands, and
//! the RSS of an idle instance. Ours runs twice: as `vtpm socket` (the administrator's binary, with the Xen
//! backend and clap in it) and as `xvtpm-swtpm` (the drop-in for swtpm, socket mode only).
//!
//! Run: `cargo bench -p xvtpm-vtpm --bench socket_vs_swtpm` (env `ITERS`, default 3000;
//! `RSS_STARTS`, default 9; `BENCH_NO_PIN=1` leaves client and servers unpinned).
//! Needs Debian's swtpm (`apt-get install swtpm`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use xvtpm_tests::tpm2::{self, TcpTpm};
use xvtpm_tests::{percentiles, procstat};

struct Server {
    name: &'static str,
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(name: &'static str, exe: &str, state: &Path, pin: bool) -> anyhow::Result<Server> {
    std::fs::create_dir_all(state)?;
    let log = state.with_extension("log");
    let cmd = match pin {
        // The servers share CPU 1; the client runs on CPU 0 (see `main`).
        true => {
            let mut c = Command::new("taskset");
            c.args(["-c", "1", exe]);
            c
        }
        false => Command::new(exe),
    };
    let started = tpm2::start_socket_server(cmd, state, std::fs::File::create(&log)?.into(), Duration::from_secs(20));
    match started {
        Ok((child, port)) => Ok(Server { name, child, port }),
        Err(e) => anyhow::bail!("{name} {e}: {}", std::fs::read_to_string(&log).unwrap_or_default()),
    }
}

/// Pinning makes the figures repeatable: unpinned, the scheduler's placement of client and
/// server (same CPU or not) swings every median by 2x from run to run on a 2-core machine.
fn pinned() -> bool {
    std::thread::available_parallelism().map(|n| n.get() >= 2).unwrap_or(false)
        && std::env::var_os("BENCH_NO_PIN").is_none()
}

/// Puts the calling thread on `cpu`.
fn pin_self(cpu: u32) -> anyhow::Result<()> {
    let tid = std::fs::read_link("/proc/thread-self")?;
    let tid = tid.file_name().and_then(|t| t.to_str()).unwrap_or_default().to_string();
    let st = Command::new("taskset").args(["-pc", &cpu.to_string(), &tid]).stdout(Stdio::null()).status()?;
    anyhow::ensure!(st.success(), "taskset -pc {cpu} {tid} failed");
    Ok(())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Medians for both servers, interleaved in blocks: 100 commands back to back to one server,
/// then 100 to the other (alternating which goes first), so both see the same machine noise
/// while each still sees a client that sends its commands back to back.
fn medians(
    clients: &mut [TcpTpm],
    cmd: &[u8],
    iters: usize,
    after: impl Fn(&mut TcpTpm, &[u8]),
) -> anyhow::Result<Vec<Duration>> {
    const BLOCK: usize = 100;
    let warmup = iters / 10;
    let mut samples = vec![Vec::with_capacity(iters); clients.len()];
    for round in 0..(iters + warmup).div_ceil(BLOCK) {
        for k in 0..clients.len() {
            let j = (k + round) % clients.len();
            let t = &mut clients[j];
            for i in round * BLOCK..(round + 1) * BLOCK {
                let start = Instant::now();
                let rsp = t.transmit(cmd)?;
                let took = start.elapsed();
                anyhow::ensure!(tpm2::rc(&rsp) == 0, "command failed: rc {:#x}", tpm2::rc(&rsp));
                after(t, &rsp);
                if i >= warmup {
                    samples[j].push(took);
                }
            }
        }
    }
    Ok(samples.iter_mut().map(|s| percentiles(s).0).collect())
}

/// The floor under both servers: a 10-byte ping-pong over TCP loopback with a trivial echo
/// thread (no TPM, no parsing). With `spin` the echo thread never sleeps (a non-blocking read
/// in a loop): nothing that answers over this socket can be faster, so with the client
/// blocking in its read, as tpm2-tss' swtpm TCTI does, it bounds every server's ratio.
fn tcp_floor(iters: usize, pin: bool, spin: bool) -> anyhow::Result<Duration> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    let port = listener.local_addr()?.port();
    let echo = std::thread::spawn(move || -> anyhow::Result<()> {
        if pin {
            pin_self(1)?;
        }
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 10];
        let mut got = 0;
        loop {
            if spin {
                // Our server's own spin (readiness check, then read), with no time limit.
                while !xvtpm_vtpm::sys::nowait::spin_until_readable(&s, Duration::from_secs(3600)) {}
            }
            match s.read(&mut b[got..])? {
                0 => return Ok(()),
                n => got += n,
            }
            if got == b.len() {
                s.write_all(&b)?;
                got = 0;
            }
        }
    });
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
    c.set_nodelay(true)?;
    let mut samples = Vec::with_capacity(iters);
    let mut b = [0u8; 10];
    for i in 0..iters + iters / 10 {
        let t = Instant::now();
        c.write_all(&b)?;
        c.read_exact(&mut b)?;
        if i >= iters / 10 {
            samples.push(t.elapsed());
        }
    }
    drop(c);
    let _ = echo.join();
    Ok(percentiles(&mut samples).0)
}

/// The three servers on free ports (control one above data), each on its state in `dir`.
/// Ours needs `dir/ours` made by `vtpm create` (our socket mode never creates a TPM on its
/// own); the drop-in creates its state itself, as swtpm does.
fn spawn_all(dir: &Path, pin: bool) -> anyhow::Result<[Server; 3]> {
    Ok([
        spawn("swtpm 0.7 (Debian)", "swtpm", &dir.join("swtpm"), pin)?,
        spawn("vtpm socket", env!("CARGO_BIN_EXE_vtpm"), &dir.join("ours"), pin)?,
        spawn("xvtpm-swtpm", env!("CARGO_BIN_EXE_xvtpm-swtpm"), &dir.join("dropin"), pin)?,
    ])
}

/// Resident size of an idle instance, median over `starts` fresh starts of each server
/// (interleaved): where the kernel places each shared library moves a single reading by about
/// 100 KiB. Each reading is taken 300 ms after the server answered its first command.
fn idle_rss(dir: &Path, pin: bool, starts: usize) -> anyhow::Result<Vec<u64>> {
    let mut readings: Vec<Vec<u64>> = (0..3).map(|_| Vec::with_capacity(starts)).collect();
    for _ in 0..starts {
        let servers = spawn_all(dir, pin)?;
        std::thread::sleep(Duration::from_millis(300));
        for (r, s) in readings.iter_mut().zip(&servers) {
            r.push(rss_kib(s.child.id()));
        }
    }
    Ok(readings
        .into_iter()
        .map(|mut r| {
            r.sort_unstable();
            r[r.len() / 2]
        })
        .collect())
}

fn main() -> anyhow::Result<()> {
    let iters: usize = std::env::var("ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    let dir = std::env::temp_dir().join(format!("xvtpm-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // Decided once: after pinning, this thread sees a single CPU.
    let pin = pinned();
    if pin {
        pin_self(0)?;
    }
    let st =
        Command::new(env!("CARGO_BIN_EXE_vtpm")).arg("create").arg("--state-dir").arg(dir.join("ours")).output()?;
    anyhow::ensure!(st.status.success(), "vtpm create: {}", String::from_utf8_lossy(&st.stderr));
    let servers = spawn_all(&dir, pin)?;
    println!("TPM 2.0 over the TCP data channel, one connection each, TCP_NODELAY, {iters} iterations interleaved in blocks of 100 (CreatePrimary: {}), medians", iters / 20);
    if pin {
        println!("client on CPU 0, all servers on CPU 1");
    }
    println!(
        "{:<34} {:>14} {:>14} {:>8} {:>14} {:>8}",
        "command", servers[0].name, servers[1].name, "ratio", servers[2].name, "ratio"
    );
    let digest = [0x5au8; 32];
    type Row = (&'static str, Vec<u8>, usize);
    let rows: Vec<Row> = vec![
        ("GetRandom(32)", tpm2::get_random(32), iters),
        ("PCR_Read (sha256, PCR 0-7)", tpm2::pcr_read_sha256_0_7(), iters),
        ("PCR_Extend (PCR 16, sha256)", tpm2::pcr_extend_sha256(16, &digest), iters),
        ("CreatePrimary ECC P-256", tpm2::create_primary_ecc_p256(), (iters / 20).max(20)),
    ];
    let mut first_median = Duration::ZERO;
    let mut clients: Vec<TcpTpm> = servers.iter().map(|s| TcpTpm::connect(s.port)).collect::<Result<_, _>>()?;
    for (label, cmd, n) in rows {
        let flush = |t: &mut TcpTpm, rsp: &[u8]| {
            if let Some(h) = tpm2::created_handle(rsp).filter(|_| label.starts_with("CreatePrimary")) {
                let _ = t.transmit(&tpm2::flush_context(h));
            }
        };
        let m = medians(&mut clients, &cmd, n, flush)?;
        if first_median.is_zero() {
            first_median = m[0];
        }
        let us = |d: Duration| format!("{:.1} µs", d.as_secs_f64() * 1e6);
        let ratio = |d: Duration| d.as_secs_f64() / m[0].as_secs_f64();
        println!(
            "{label:<34} {:>14} {:>14} {:>7.2}x {:>14} {:>7.2}x",
            us(m[0]),
            us(m[1]),
            ratio(m[1]),
            us(m[2]),
            ratio(m[2])
        );
    }
    for (label, spin) in [("TCP echo, no TPM, sleeping", false), ("TCP echo, no TPM, spinning", true)] {
        let floor = tcp_floor(iters, pin, spin)?;
        println!(
            "{label:<34} {:>14} {:>7.2}x of swtpm's GetRandom",
            format!("{:.1} µs", floor.as_secs_f64() * 1e6),
            floor.as_secs_f64() / first_median.as_secs_f64()
        );
    }
    // What each server process spends per command (/proc schedstat), back to back and paced.
    let n = (iters / 3).max(100);
    let getrandom = tpm2::get_random(32);
    for (label, pause) in [("CPU/cmd, back to back", Duration::ZERO), ("CPU/cmd, 1 ms apart", Duration::from_millis(1))]
    {
        let mut per = Vec::new();
        for (s, t) in servers.iter().zip(clients.iter_mut()) {
            let before = procstat::cpu(s.child.id());
            for _ in 0..n {
                let rsp = t.transmit(&getrandom)?;
                anyhow::ensure!(tpm2::rc(&rsp) == 0, "GetRandom failed");
                if !pause.is_zero() {
                    std::thread::sleep(pause);
                }
            }
            per.push((procstat::cpu(s.child.id()) - before).as_secs_f64() * 1e6 / n as f64);
        }
        println!(
            "{:<34} {:>14} {:>14} {:>7.2}x {:>14} {:>7.2}x",
            format!("{label} (GetRandom, {n})"),
            format!("{:.1} µs", per[0]),
            format!("{:.1} µs", per[1]),
            per[1] / per[0],
            format!("{:.1} µs", per[2]),
            per[2] / per[0]
        );
    }
    drop(clients);
    drop(servers);
    let starts: usize = std::env::var("RSS_STARTS").ok().and_then(|v| v.parse().ok()).unwrap_or(9).max(1);
    let idle = idle_rss(&dir, pin, starts)?;
    let ratio = |kib: u64| kib as f64 / idle[0].max(1) as f64;
    println!(
        "{:<34} {:>10} KiB {:>10} KiB {:>7.2}x {:>10} KiB {:>7.2}x",
        format!("RSS, idle, median of {starts} starts"),
        idle[0],
        idle[1],
        ratio(idle[1]),
        idle[2],
        ratio(idle[2])
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
