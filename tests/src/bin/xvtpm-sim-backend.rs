//! tpmback with the test handler, as one domain of a simulated Xen. Prints READY once it
//! watches xenstore, then serves until killed.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;
use xvtpm_backend::{Backend, BackendConfig, DeviceFilter};
use xvtpm_xen::sim::SimXen;

#[derive(Parser, Debug)]
#[command(about = "tpmback on a simulated Xen, echoing commands (for tests and benchmarks)")]
struct Args {
    /// Simulation directory (made by the test's SimHost).
    #[arg(long)]
    dir: std::path::PathBuf,
    /// Domain id to act as.
    #[arg(long, default_value_t = 0)]
    domid: u16,
    /// Serve only the device with this uuid.
    #[arg(long)]
    uuid: Option<String>,
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let filter = match args.uuid {
        Some(u) => DeviceFilter::Uuid(u),
        None => DeviceFilter::All,
    };
    let xen = Arc::new(SimXen::new(&args.dir, args.domid));
    let backend = Backend::new(xen, Arc::new(xvtpm_tests::TestHandler), BackendConfig::serving(filter));
    let handle = backend.spawn()?;
    println!("READY");
    // Serve until killed; a closed stdout is no reason to stop.
    let never = AtomicBool::new(false);
    while !never.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::park();
    }
    handle.stop()?;
    Ok(())
}
