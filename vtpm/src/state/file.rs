//! The file state store (being written).
