//! What libxl writes to xenstore for domains and vtpm devices, so tests (and the simulated
//! demo) set devices up exactly as `xl create` would, and so the operator's tool can make a
//! short-lived vtpm device of its own (the admin channel to a manager in its own domain).

use std::time::{Duration, Instant};

use crate::xenbus::{domain_path, vtpm_backend_path, vtpm_frontend_path};
use crate::{DomId, Perm, PermAccess, Result, TxId, XenbusState, Xenstore};

fn perms(owner: DomId, reader: Option<DomId>) -> Vec<Perm> {
    let mut p = vec![Perm { domid: owner, access: PermAccess::None }];
    if let Some(r) = reader {
        p.push(Perm { domid: r, access: PermAccess::Read });
    }
    p
}

/// The domain uuid a `vm` path (or a life, `<vm>@<start_time>`) names: `/vm/<uuid>` as libxl
/// makes it; `None` for any other path.
pub fn uuid_of_vm(vm: &str) -> Option<String> {
    let vm = vm.trim().split('@').next()?;
    crate::xenbus::parse_uuid("vm", vm.strip_prefix("/vm/")?.as_bytes()).ok()
}

/// One life of domain `domid` as libxl records it: its `vm` path and that path's `start_time`
/// (`<vm>@<start_time>`; the `vm` path alone if it has none). Together they differ for every
/// domain libxl makes, even one reusing an old id. `None` where the domain has no `vm` node;
/// an error where xenstore refuses the read (only dom0 and the domain itself may).
pub fn domain_life(xs: &Xenstore, domid: DomId) -> Result<Option<String>> {
    let Some(vm) = xs.try_read(TxId::NONE, &format!("{}/vm", domain_path(domid)))? else { return Ok(None) };
    let vm = String::from_utf8_lossy(&vm).into_owned();
    Ok(Some(match xs.try_read(TxId::NONE, &format!("{vm}/start_time"))? {
        Some(s) => format!("{vm}@{}", String::from_utf8_lossy(&s)),
        None => vm,
    }))
}

/// dom0's own nodes, as `xen-init-dom0` writes them.
pub fn init_dom0(xs: &Xenstore) -> Result<()> {
    xs.write(TxId::NONE, "/local/domain/0/domid", b"0")?;
    xs.write(TxId::NONE, "/local/domain/0/name", b"Domain-0")
}

/// The `vm` path the simulated toolstack gives domain `domid` (libxl's is `/vm/<uuid>`).
pub fn vm_path(domid: DomId) -> String {
    format!("/vm/sim-{domid}")
}

/// A domain's home, as libxl makes it: `/local/domain/<id>` readable by the domain, with a
/// `device` directory the domain owns, and its `vm` node naming `/vm/...`, where libxl
/// records the domain's `start_time` (so a domain reusing an old id is told apart).
pub fn add_domain(xs: &Xenstore, domid: DomId, name: &str) -> Result<()> {
    add_domain_of(xs, domid, name, &vm_path(domid))
}

/// [`add_domain`] with the `vm` path `vm`: a restored or migrated domain keeps its old one
/// (`/vm/<domain uuid>`), with a new `start_time`.
pub fn add_domain_of(xs: &Xenstore, domid: DomId, name: &str, vm: &str) -> Result<()> {
    let home = domain_path(domid);
    // libxl writes seconds and hundredths; nanoseconds keep two quick test domains apart.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let start = format!("{}.{:09}", now.as_secs(), now.subsec_nanos());
    xs.transaction(|tx| {
        xs.mkdir(tx, &home)?;
        xs.set_perms(tx, &home, &perms(0, Some(domid)))?;
        xs.write(tx, &format!("{home}/domid"), domid.to_string().as_bytes())?;
        xs.write(tx, &format!("{home}/name"), name.as_bytes())?;
        xs.write(tx, &format!("{home}/vm"), vm.as_bytes())?;
        xs.write(tx, &format!("{vm}/name"), name.as_bytes())?;
        xs.write(tx, &format!("{vm}/start_time"), start.as_bytes())?;
        xs.mkdir(tx, &format!("{home}/device"))?;
        xs.set_perms(tx, &format!("{home}/device"), &perms(domid, None))
    })
}

/// What libxl records of a PV domain it built: the domain's `vm` node, and under it
/// `image/ostype`, `image/kernel`, `image/ramdisk`, `image/cmdline` (written by the toolstack
/// only; the domain can read them).
pub fn record_pv_image(xs: &Xenstore, domid: DomId, kernel: &str, ramdisk: Option<&str>, cmdline: &str) -> Result<()> {
    let vm = vm_path(domid);
    xs.transaction(|tx| {
        xs.write(tx, &format!("{}/vm", domain_path(domid)), vm.as_bytes())?;
        xs.write(tx, &format!("{vm}/image/ostype"), b"linux")?;
        xs.write(tx, &format!("{vm}/image/kernel"), kernel.as_bytes())?;
        if let Some(r) = ramdisk {
            xs.write(tx, &format!("{vm}/image/ramdisk"), r.as_bytes())?;
        }
        xs.write(tx, &format!("{vm}/image/cmdline"), cmdline.as_bytes())
    })
}

/// Removes a domain's home and its `vm` record (what remains after `xl destroy`).
pub fn remove_domain(xs: &Xenstore, domid: DomId) -> Result<()> {
    let vm = xs.try_read(TxId::NONE, &format!("{}/vm", domain_path(domid)))?;
    xs.rm(TxId::NONE, &domain_path(domid))?;
    match vm {
        Some(vm) => xs.try_rm(TxId::NONE, &String::from_utf8_lossy(&vm)),
        None => Ok(()),
    }
}

/// Asks a guest to suspend, as libxl does for `xl save` and `xl migrate`.
pub fn request_suspend(xs: &Xenstore, domid: DomId) -> Result<()> {
    xs.write(TxId::NONE, &format!("{}/control/shutdown", domain_path(domid)), b"suspend")
}

/// A vtpm device as libxl adds it for `vtpm=["backend=<be>,uuid=<uuid>"]`: the backend
/// directory (owned by the backend, readable by the frontend) and the frontend directory
/// (owned by the frontend, readable by the backend), both in state Initialising.
pub fn add_vtpm(xs: &Xenstore, frontend: DomId, backend: DomId, handle: u32, uuid: &str) -> Result<()> {
    let fe = vtpm_frontend_path(frontend, handle);
    xs.transaction(|tx| add_vtpm_at(xs, tx, &fe, frontend, backend, handle, uuid))
}

/// [`add_vtpm`] with the frontend directory at `fe` (inside the frontend's domain), in
/// transaction `tx`.
pub fn add_vtpm_at(
    xs: &Xenstore,
    tx: TxId,
    fe: &str,
    frontend: DomId,
    backend: DomId,
    handle: u32,
    uuid: &str,
) -> Result<()> {
    let be = vtpm_backend_path(backend, frontend, handle);
    // Like libxl: make each directory and set its permissions first, so that every key
    // written into it inherits them.
    xs.mkdir(tx, &be)?;
    xs.set_perms(tx, &be, &perms(backend, Some(frontend)))?;
    for (k, v) in [
        ("frontend", fe.to_string()),
        ("frontend-id", frontend.to_string()),
        ("online", "1".into()),
        ("state", "1".into()),
        ("handle", handle.to_string()),
        ("uuid", uuid.to_string()),
        ("resume", "False".into()),
    ] {
        xs.write(tx, &format!("{be}/{k}"), v.as_bytes())?;
    }
    xs.mkdir(tx, fe)?;
    xs.set_perms(tx, fe, &perms(frontend, Some(backend)))?;
    for (k, v) in [
        ("backend", be.clone()),
        ("backend-id", backend.to_string()),
        ("state", "1".into()),
        ("handle", handle.to_string()),
    ] {
        xs.write(tx, &format!("{fe}/{k}"), v.as_bytes())?;
    }
    Ok(())
}

/// Waits until a node holds `want`, up to `timeout`; returns whether it did.
pub fn wait_for_state(xs: &Xenstore, path: &str, want: XenbusState, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(v)) = xs.try_read(TxId::NONE, path) {
            if XenbusState::parse(path, &v).ok() == Some(want) {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Removes a vtpm device as `xl destroy` / `xl vtpm-detach` does: backend state Closing, wait
/// (libxl: 10 s) for the backend to reach Closed, then remove both directories; a backend in a
/// driver domain (not dom0) must remove its own directory, and libxl waits for that too.
/// Returns whether the backend did its part in time; the directories are removed either way.
pub fn remove_vtpm(xs: &Xenstore, frontend: DomId, backend: DomId, handle: u32, timeout: Duration) -> Result<bool> {
    remove_vtpm_at(xs, &vtpm_frontend_path(frontend, handle), frontend, backend, handle, timeout)
}

/// [`remove_vtpm`] with the frontend directory at `fe`.
pub fn remove_vtpm_at(
    xs: &Xenstore,
    fe: &str,
    frontend: DomId,
    backend: DomId,
    handle: u32,
    timeout: Duration,
) -> Result<bool> {
    let be = vtpm_backend_path(backend, frontend, handle);
    xs.write(TxId::NONE, &format!("{be}/online"), b"0")?;
    xs.write(TxId::NONE, &format!("{be}/state"), XenbusState::Closing.as_str().as_bytes())?;
    let closed = wait_for_state(xs, &format!("{be}/state"), XenbusState::Closed, timeout);
    if backend != 0 {
        // A driver domain's backend directory is the driver domain's to remove (xl devd);
        // libxl removes the frontend's, then waits for it, then removes it itself.
        xs.try_rm(TxId::NONE, fe)?;
        let end = Instant::now() + timeout;
        while xs.try_read(TxId::NONE, &be)?.is_some() {
            if Instant::now() > end {
                xs.try_rm(TxId::NONE, &be)?;
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        return Ok(closed);
    }
    for p in [be.as_str(), fe] {
        xs.try_rm(TxId::NONE, p)?;
    }
    Ok(closed)
}

#[cfg(test)]
mod tests {
    use super::uuid_of_vm;

    #[test]
    fn the_uuid_comes_from_the_vm_path_or_a_life() {
        let want = Some("5e1f0a2b-7c3d-4e5f-8a9b-0c1d2e3f4a5b");
        assert_eq!(uuid_of_vm("/vm/5E1F0A2B-7C3D-4E5F-8A9B-0C1D2E3F4A5B").as_deref(), want);
        // serve-hvm passes the domain's life (`<vm>@<start_time>`).
        assert_eq!(uuid_of_vm("/vm/5e1f0a2b-7c3d-4e5f-8a9b-0c1d2e3f4a5b@1796656826.13").as_deref(), want);
        assert_eq!(uuid_of_vm("/vm/not-a-uuid"), None);
        assert_eq!(uuid_of_vm("/local/domain/3"), None);
    }
}
