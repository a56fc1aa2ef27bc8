//! The seed corpus: a few small valid (and a few nearly valid) inputs per target, built with
//! the project's own encoders. `cargo run --example gen_corpus` writes them under `corpus/`.

use xvtpm_proto::ctrl::*;
use xvtpm_proto::mgr::{GroupShow, Page, Reply, Request, VtpmShow};
use xvtpm_proto::{tpm, Secret, Uuid};
use xvtpm_tis::Family;
use xvtpm_vtpm::state::managed;
use xvtpm_vtpmmgr::store::node::{Child, Node};
use xvtpm_vtpmmgr::store::root::Root;
use xvtpm_vtpmmgr::store::Record;
use xvtpm_xen::xenstore::wire::{nul_terminated, Message, MsgType};

use crate::state_header::{managed_slot, sample_blobs, KEY};

/// One seed: target, file name, bytes.
pub type Seed = (&'static str, String, Vec<u8>);

/// Every seed of every target.
pub fn all() -> Vec<Seed> {
    let mut v = Vec::new();
    v.extend(tpmif_page().into_iter().map(|(n, b)| ("tpmif_page", n, b)));
    v.extend(xenstore_wire().into_iter().map(|(n, b)| ("xenstore_wire", n, b)));
    v.extend(mgr_request().into_iter().map(|(n, b)| ("mgr_request", n, b)));
    v.extend(swtpm_ctrl().into_iter().map(|(n, b)| ("swtpm_ctrl", n, b)));
    v.extend(state_header().into_iter().map(|(n, b)| ("state_header", n, b)));
    v.extend(tis_response().into_iter().map(|(n, b)| ("tis_response", n, b)));
    v
}

const GET_RANDOM: [u8; 12] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7B, 0, 16];

fn tpmif(len: u32, state: u8, locality: u8, pad: u8, nr_extra: u8, rest: &[u8]) -> Vec<u8> {
    let mut b = len.to_ne_bytes().to_vec();
    b.extend_from_slice(&[state, locality, pad, nr_extra]);
    b.extend_from_slice(rest);
    b
}

fn tpmif_page() -> Vec<(String, Vec<u8>)> {
    let mut extra = vec![0u8; 12];
    extra.extend_from_slice(&GET_RANDOM);
    vec![
        ("idle".into(), tpmif(0, 0, 0, 0, 0, &[])),
        ("submit-getrandom".into(), tpmif(12, 1, 0, 0, 0, &GET_RANDOM)),
        ("submit-locality3-extra-pages".into(), tpmif(12, 1, 3, 0x80, 3, &extra)),
        ("finish".into(), tpmif(10, 2, 0, 0x7F, 0, &[0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0])),
        ("cancel".into(), tpmif(0, 3, 0, 0, 0, &[])),
        ("bad-state-long-length".into(), tpmif(4089, 7, 0, 0, 0, &[0xAA; 16])),
        ("extra-pages-max".into(), tpmif(8, 1, 4, 0, 255, &[1, 2, 3, 4, 5, 6, 7, 8])),
    ]
}

fn xs(ty: MsgType, req: u32, payload: &[u8]) -> Vec<u8> {
    Message::new(ty, req, 0, payload.to_vec()).expect("small payload").encode()
}

fn xenstore_wire() -> Vec<(String, Vec<u8>)> {
    let watch = xs(MsgType::WatchEvent, 0, &nul_terminated(&[b"/local/domain/0/backend/vtpm/1/0", b"be"]));
    let mut events = vec![0x83];
    events.extend_from_slice(&watch);
    events.extend_from_slice(&xs(MsgType::Error, 2, b"ENOENT\0"));
    events.extend_from_slice(&xs(MsgType::Read, 3, b"4"));
    let mut truncated = vec![0x01];
    truncated.extend_from_slice(&xs(MsgType::Read, 1, b"0123456789")[..20]);
    let mut oversized = vec![0x00];
    oversized.extend_from_slice(&[2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0x89, 0x13, 0, 0]);
    let with_mode = |m: u8, b: Vec<u8>| [vec![m], b].concat();
    vec![
        ("read-reply".into(), with_mode(0x05, xs(MsgType::Read, 1, b"value"))),
        ("watch-error-read".into(), events),
        ("get-perms".into(), with_mode(0x11, xs(MsgType::GetPerms, 4, b"b0\0r5\0n7\0"))),
        ("directory".into(), with_mode(0x7F, xs(MsgType::Directory, 5, b"0\0backend\0device\0"))),
        ("transaction-start".into(), with_mode(0x02, xs(MsgType::TransactionStart, 6, b"12\0"))),
        ("uuid".into(), with_mode(0x40, xs(MsgType::Read, 7, b"00112233-4455-6677-8899-aabbccddeeff"))),
        ("truncated".into(), truncated),
        ("oversized".into(), oversized),
    ]
}

fn mgr_request() -> Vec<(String, Vec<u8>)> {
    let u = Uuid([7; 16]);
    let reqs = [
        ("savehashkey", Request::SaveHashKey(Secret(vec![1; 64]))),
        ("loadhashkey", Request::LoadHashKey),
        ("get-boot-hash", Request::GetBootHash),
        ("get-quote", Request::GetQuote { nonce: [9; 20], pcrs: vec![0, 7, 16, 23] }),
        ("bind", Request::Bind { uuid: u, token: Secret(b"secret".to_vec()) }),
        ("group-list", Request::GroupList { offset: 3 }),
        ("group-new", Request::GroupNew),
        ("group-del", Request::GroupDel { group: 2 }),
        ("group-show", Request::GroupShow { group: 2 }),
        ("vtpm-list", Request::VtpmList { group: 1, offset: 255 }),
        ("vtpm-show", Request::VtpmShow { uuid: u }),
        ("vtpm-new", Request::VtpmNew { group: 1, named: None }),
        ("vtpm-new-named", Request::VtpmNew { group: 1, named: Some((u, Some(Secret([5; 32])))) }),
        ("vtpm-del", Request::VtpmDel { uuid: u }),
        ("group-approve", Request::GroupApprove { group: 1, hash: [3; 32] }),
        ("group-revoke", Request::GroupRevoke { group: 1, hash: [3; 32] }),
        ("group-approved", Request::GroupApproved { group: 1, offset: 127 }),
        ("migration-key", Request::MigrationKey),
        ("vtpm-export", Request::VtpmExport { uuid: u, to: vec![4; 130], force: false }),
        ("migration-trust", Request::MigrationTrust { source: vec![5; 130] }),
        ("vtpm-set-uid", Request::VtpmSetUid { uuid: u, uid: Some(1000) }),
        ("vtpm-import", Request::VtpmImport { group: 1, bundle: vec![6; 40] }),
    ];
    let mut v: Vec<(String, Vec<u8>)> = reqs.into_iter().map(|(n, r)| (format!("req-{n}"), r.encode())).collect();
    let show = VtpmShow { group: 3, has_key: true, exported: false };
    v.push(("reply-vtpm-show".into(), Reply::ok(show.encode()).encode()));
    v.push(("body-vtpm-show".into(), show.encode()));
    v.push(("body-group-show".into(), GroupShow { uuid: u, vtpms: 2 }.encode()));
    v.push(("body-page16".into(), Page::<16>::of(&[[1; 16], [2; 16], [3; 16]], 1).encode()));
    v.push(("reply-refused".into(), Reply::refuse(xvtpm_proto::mgr::TAG_RSP2, 30).encode()));
    // GET_QUOTE with the trailing flags Xen's clients send.
    let mut quote = Request::GetQuote { nonce: [1; 20], pcrs: vec![0, 1] }.body();
    quote.extend_from_slice(&[0, 0, 0, 1]);
    v.push(("req-get-quote-flags".into(), tpm::frame(xvtpm_proto::mgr::TAG_REQ, 4, &quote)));
    v
}

fn swtpm_ctrl() -> Vec<(String, Vec<u8>)> {
    let req = |c: CtrlCmd, body: &[u8]| encode_request(c.code(), body);
    let mut hash = 4u32.to_be_bytes().to_vec();
    hash.extend_from_slice(b"data");
    let mut set_state =
        SetStateRequest { state_flags: 0, blob_type: PTM_BLOB_TYPE_VOLATILE, length: 8 }.encode().to_vec();
    set_state.extend_from_slice(&[0x5A; 8]);
    let mut stream = req(CtrlCmd::SetLocality, &[3]);
    stream.extend_from_slice(&req(CtrlCmd::Init, &InitRequest { init_flags: 1 }.encode()));
    stream.extend_from_slice(&req(CtrlCmd::GetCapability, &[]));
    vec![
        ("get-capability".into(), req(CtrlCmd::GetCapability, &[])),
        ("init".into(), req(CtrlCmd::Init, &InitRequest { init_flags: PTM_INIT_FLAG_DELETE_VOLATILE }.encode())),
        ("set-locality".into(), req(CtrlCmd::SetLocality, &[2])),
        ("hash-data".into(), req(CtrlCmd::HashData, &hash)),
        (
            "get-stateblob".into(),
            req(
                CtrlCmd::GetStateBlob,
                &GetStateRequest { state_flags: 0, blob_type: PTM_BLOB_TYPE_PERMANENT, offset: 0 }.encode(),
            ),
        ),
        ("set-stateblob".into(), req(CtrlCmd::SetStateBlob, &set_state)),
        ("set-buffersize".into(), req(CtrlCmd::SetBufferSize, &SetBufferSizeRequest { buffersize: 4096 }.encode())),
        ("get-info".into(), req(CtrlCmd::GetInfo, &GetInfoRequest { flags: 3, offset: 0 }.encode())),
        ("stream".into(), stream),
        ("resp-est".into(), EstResponse { tpm_result: 0, bit: 1 }.encode().to_vec()),
        (
            "resp-getstate".into(),
            GetStateResponse { tpm_result: 0, state_flags: 0, totlength: 100, length: 100 }.encode().to_vec(),
        ),
        (
            "resp-buffersize".into(),
            SetBufferSizeResponse { tpm_result: 0, buffersize: 4096, minsize: 2048, maxsize: 8192 }.encode().to_vec(),
        ),
    ]
}

fn trimmed(mut b: Vec<u8>) -> Vec<u8> {
    while b.last() == Some(&0) {
        b.pop();
    }
    b
}

fn state_header() -> Vec<(String, Vec<u8>)> {
    let with = |sel: u8, head: &[u8], b: &[u8]| [&[sel][..], head, b].concat();
    let stores = crate::state_header::stores();
    let keyed = stores.0.encode("permall", b"permanent state").expect("encode");
    let plain = stores.1.encode("volatilestate", b"volatile state").expect("encode");
    let blobs = managed::encode(&sample_blobs());
    let slot = managed_slot(&blobs, [0; 12]);
    let mut sealed = b"XVTPMSEA".to_vec();
    sealed.extend_from_slice(&6u32.to_le_bytes());
    sealed.extend_from_slice(b"sealed");
    let root = Root {
        seq: 3,
        counter: 7,
        node: 4,
        tag: [9; 16],
        depth: 1,
        count: 2,
        high_water: 5,
        sealed_digest: [1; 32],
        version: 2,
    };
    let mut fields = Vec::new();
    for v in [root.seq, root.counter, root.node] {
        fields.extend_from_slice(&v.to_le_bytes());
    }
    fields.push(root.depth);
    fields.extend_from_slice(&root.count.to_le_bytes());
    fields.extend_from_slice(&root.high_water.to_le_bytes());
    fields.extend_from_slice(&root.tag);
    fields.extend_from_slice(&root.sealed_digest);
    let mut rec = Record::new([5; 16], 1);
    rec.flags = 1;
    rec.hash = [6; 32];
    let leaf = Node::Leaf(vec![Record::new([1; 16], 0), rec]);
    let internal = Node::Internal(vec![
        Child { key: [0; 16], block: 3, tag: [1; 16] },
        Child { key: [8; 16], block: 4, tag: [2; 16] },
    ]);
    vec![
        ("file-keyed".into(), with(0, &[0], &keyed)),
        ("file-plain".into(), with(0, &[1], &plain)),
        ("file-managed".into(), with(0, &[0], &slot)),
        ("round-trip".into(), with(1, &[0, 0x20, 0x05], b"a blob")),
        ("managed-plaintext".into(), with(2, &[], &blobs)),
        ("managed-open-a".into(), with(3, &[0], &blobs)),
        ("managed-open-b-garbage".into(), with(3, &[5], &blobs)),
        ("managed-open-raw".into(), with(3, &[2], &slot)),
        ("manager-reply".into(), with(4, &[], &Reply::ok(vec![0xAB; 64]).encode())),
        ("sealed-block".into(), with(5, &[], &sealed)),
        ("root-sealed".into(), with(6, &[], &root.seal(&KEY))),
        ("root-fields".into(), with(6, &[], &fields)),
        ("node-leaf".into(), with(7, &[], &trimmed(leaf.encode().to_vec()))),
        ("node-internal".into(), with(7, &[], &trimmed(internal.encode().to_vec()))),
    ]
}

fn tis_response() -> Vec<(String, Vec<u8>)> {
    let ok20 = tpm::frame(0x8001, 0, &[0, 4, 1, 2, 3, 4]);
    let ok12 = tpm::frame(0x00C4, 0, &[0, 0, 0, 4, 9, 9, 9, 9]);
    let mut lying = ok20.clone();
    lying[5] = 40;
    let mut v = Vec::new();
    for (m, name) in [(0u8, "ptp"), (1, "tis12"), (2, "tis20"), (3, "crb")] {
        let rsp = if m == 1 { &ok12 } else { &ok20 };
        v.push((format!("{name}-ok"), [&[m, 0x10][..], rsp].concat()));
    }
    v.push(("ptp-size-lies".into(), [&[0, 1][..], &lying].concat()));
    v.push(("crb-size-lies".into(), [&[3, 2][..], &lying].concat()));
    v.push(("ptp-locality4-error".into(), [&[0, 4][..], &tpm::error_response(Family::Tpm20, 0x101)].concat()));
    v.push(("getrandom-command".into(), GET_RANDOM.to_vec()));
    v
}
