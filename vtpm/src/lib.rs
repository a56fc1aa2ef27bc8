//! Per-guest vTPM (engine, state store, swtpm-compatible socket). Built in a later issue.
#![forbid(unsafe_code)]
