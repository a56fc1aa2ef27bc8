//! vTPM manager: per-vTPM keys sealed by the hardware TPM. Built in a later issue.
#![forbid(unsafe_code)]
