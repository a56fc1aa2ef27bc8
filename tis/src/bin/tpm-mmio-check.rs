//! `tpm-mmio-check`: finds the TPM at 0xFED40000 through `/dev/mem` with our driver and runs
//! the self-test checks against it, printing `XVTPM-TIS: key=value` lines. The QEMU device
//! tests run it inside a VM; on a real machine it shows what the hardware TPM is and whether
//! the driver can use it (run it only where no kernel driver owns the TPM: it extends PCR 16
//! and resets PCR 20/21 at locality 2).

#![forbid(unsafe_code)]

use anyhow::Context;
use xvtpm_tis::devmem::DevMem;
use xvtpm_tis::{selftest, SystemClock, Tis};

fn say(k: &str, v: impl std::fmt::Display) {
    println!("XVTPM-TIS: {k}={v}");
}

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).is_some_and(|a| a == "--help" || a == "-h") {
        println!("usage: tpm-mmio-check\n\nDrives the TPM at 0xFED40000 through /dev/mem (TIS 1.2, PTP FIFO or CRB) and prints\nwhat it finds and the results of its checks as XVTPM-TIS: key=value lines.");
        return Ok(());
    }
    env_logger::init();
    let mmio = DevMem::open_tpm().context("mapping the TPM's registers")?;
    let mut tis = Tis::probe(mmio, SystemClock::new()).context("probing the TPM")?;
    let info = tis.info();
    say("interface", format!("{:?}", info.interface));
    say("vendor", format!("{:#06x}", info.vendor_id));
    say("device", format!("{:#06x}", info.device_id));
    say("revision", format!("{:#04x}", info.revision));
    for (k, v) in selftest::run(&mut tis) {
        say(&k, v);
    }
    // Timing and buffer size as the TPM reports them once it is started.
    tis.refresh();
    let t = tis.timeouts();
    say("timeouts_ms", format!("{},{},{},{}", t.a.as_millis(), t.b.as_millis(), t.c.as_millis(), t.d.as_millis()));
    let d = tis.durations();
    say("durations_ms", format!("{},{},{}", d.short.as_millis(), d.medium.as_millis(), d.long.as_millis()));
    if let Some(n) = tis.max_buffer() {
        say("max_buffer", n);
    }
    Ok(())
}
