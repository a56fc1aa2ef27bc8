//! libtpms wrapper (being written).
