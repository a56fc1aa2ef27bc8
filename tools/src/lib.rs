//! Operator CLI. Built in a later issue.
#![forbid(unsafe_code)]
