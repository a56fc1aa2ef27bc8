//! swtpm socket protocol (being written).
