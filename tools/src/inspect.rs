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
        outln!("{j}");
    } else {
        outln!("file        {}", path.display());
        outln!("format      {}", info.format);
        outln!("protection  {}", info.protection);
        outln!("size        {} bytes ({} protected)", info.file_bytes, info.payload_bytes);
        if let Some(s) = &info.sha256 {
            outln!("sha256      {s} (what the manager records for the current slot)");
        }
    }
    Ok(())
}
