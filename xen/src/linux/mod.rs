//! The real Xen interfaces of a Linux domain: `/dev/xen/evtchn`, `/dev/xen/gntdev`,
//! `/dev/xen/gntalloc` and xenstored.
