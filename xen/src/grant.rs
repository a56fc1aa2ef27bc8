//! Grants: sharing pages between domains.

use crate::{DomId, Result, SharedPage};

/// A grant reference.
pub type GrantRef = u32;

/// Maps pages other domains granted to us (`/dev/xen/gntdev`).
pub trait GrantMapper: Send + Sync + std::fmt::Debug {
    /// Maps grant `gref` of domain `domid`; unmapped when the page is dropped.
    fn map(&self, domid: DomId, gref: GrantRef, writable: bool) -> Result<SharedPage>;
}

/// Grants our own pages to other domains (`/dev/xen/gntalloc`).
pub trait GrantAllocator: Send + Sync + std::fmt::Debug {
    /// Allocates a zeroed page and grants it to `domid`; the grant is revoked when the page is
    /// dropped. [`SharedPage::gref`] tells the reference to publish.
    fn grant(&self, domid: DomId, writable: bool) -> Result<SharedPage>;
}
