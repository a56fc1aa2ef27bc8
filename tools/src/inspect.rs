//! `xvtpm inspect-state`: a state file's outside, never its contents or keys.

use std::path::Path;

use anyhow::Context;

/// Prints what the file is.
pub fn inspect_state(path: &Path, json: bool) -> anyhow::Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let info = xvtpm_vtpm::state::inspect::inspect(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if json {
        let mut j = serde_json::json!({
            "file": path.display().to_string(),
            "format": info.format.to_string(),
            "protection": info.protection.to_string(),
            "file_bytes": info.file_bytes,
            "payload_bytes": info.payload_bytes,
        });
        if let Some(s) = &info.sha256 {
            j["sha256"] = s.to_string().into();
        }
        println!("{j}");
    } else {
        println!("file        {}", path.display());
        println!("format      {}", info.format);
        println!("protection  {}", info.protection);
        println!("size        {} bytes ({} protected)", info.file_bytes, info.payload_bytes);
        if let Some(s) = &info.sha256 {
            println!("sha256      {s} (what the manager records for the current slot)");
        }
    }
    Ok(())
}
