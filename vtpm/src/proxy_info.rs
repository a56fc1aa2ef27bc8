//! The description `vtpm proxy` prints (and writes to `--info-file`) once its device is
//! registered, which `xvtpm container` reads back: one JSON object.

use serde::{Deserialize, Serialize};

/// A running container vTPM's device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyInfo {
    /// N of `/dev/tpmN`.
    pub tpm_num: u32,
    /// "2.0" or "1.2".
    pub version: String,
    /// `/dev/tpmN`.
    pub device: String,
    /// Its device numbers.
    pub major: u32,
    /// Its device numbers.
    pub minor: u32,
    /// `/dev/tpmrmN` (TPM 2.0 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rm_device: Option<String>,
    /// Its device numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rm_major: Option<u32>,
    /// Its device numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rm_minor: Option<u32>,
    /// The daemon's pid.
    pub pid: u32,
    /// Its state directory.
    pub state_dir: String,
}

impl ProxyInfo {
    /// The JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses the JSON text.
    pub fn from_json(s: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(s.trim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_and_without_a_resource_manager() {
        let mut i = ProxyInfo {
            tpm_num: 3,
            version: "2.0".into(),
            device: "/dev/tpm3".into(),
            major: 10,
            minor: 224,
            rm_device: Some("/dev/tpmrm3".into()),
            rm_major: Some(253),
            rm_minor: Some(65539),
            pid: 77,
            state_dir: "/var/lib/a \"b\"".into(),
        };
        assert!(i.to_json().starts_with(r#"{"tpm_num":3,"version":"2.0","device":"/dev/tpm3","major":10"#));
        assert_eq!(ProxyInfo::from_json(&i.to_json()).expect("parse"), i);
        (i.rm_device, i.rm_major, i.rm_minor) = (None, None, None);
        assert!(!i.to_json().contains("rm_"));
        assert_eq!(ProxyInfo::from_json(&format!("{}\n", i.to_json())).expect("parse"), i);
        assert!(ProxyInfo::from_json("{\"tpm_num\":3}").is_err());
    }
}
