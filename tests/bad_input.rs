//! Malformed, oversized and hostile messages: each gets a typed error reply and closes only its
//! own connection, while another client keeps working.

use kvtier_client::testdata;
use kvtier_proto::frame::encode;
use kvtier_proto::v1::{self as pb, request::Op, response, ErrorCode};
use kvtier_tests::{blocks_for, namespace, ok_stdout, refs, Daemon};
use prost::Message;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

fn connect(d: &Daemon) -> UnixStream {
    let s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn read_response(s: &mut UnixStream) -> pb::Response {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("a reply frame");
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    pb::Response::decode(&body[..]).unwrap()
}

fn request(id: u64, op: Op) -> Vec<u8> {
    encode(&pb::Request { id, op: Some(op) })
}

/// A connection that has said Hello (the pool fds it was sent are dropped by plain reads).
fn greeted(d: &Daemon) -> UnixStream {
    let mut s = connect(d);
    s.write_all(&request(1, Op::Hello(pb::Hello { client_name: "raw".into(), protocol_version: 1, engine: None })))
        .unwrap();
    assert!(matches!(read_response(&mut s).result, Some(response::Result::Hello(_))));
    s
}

fn register(s: &mut UnixStream, block_bytes: u64) -> pb::Response {
    s.write_all(&request(2, Op::Register(pb::Register { namespace: Some(namespace("m", block_bytes)) }))).unwrap();
    read_response(s)
}

/// Sends `bytes`, expects an error reply with `code`, then EOF.
fn expect_error_and_close(mut s: UnixStream, bytes: &[u8], code: ErrorCode) -> String {
    s.write_all(bytes).unwrap();
    let resp = read_response(&mut s);
    let Some(response::Result::Error(e)) = resp.result else { panic!("expected {code:?}, got {resp:?}") };
    assert_eq!(e.code(), code, "reason: {}", e.reason);
    assert!(!e.reason.is_empty(), "every error carries a reason");
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0, "connection closed after the error");
    e.reason
}

async fn healthy(d: &Daemon, client: &mut kvtier_client::Client, ns: &kvtier_client::Namespace, seed: u64) {
    let hashes = testdata::chained_hashes(seed, 3);
    let blocks = blocks_for(&hashes, 4096);
    assert_eq!(client.save(ns, &hashes, &refs(&blocks)).await.unwrap().stored, 3);
    let mut got = Vec::new();
    client.load(ns, &hashes, |_, b| got.push(b.to_vec())).await.unwrap();
    assert_eq!(got, blocks);
    assert!(UnixStream::connect(&d.socket).is_ok(), "daemon still accepts");
}

#[tokio::test]
async fn each_bad_message_closes_only_its_connection() {
    let mut d = Daemon::start_with_metrics(&[], true);
    let mut good = d.client("good").await;
    let ns = good.register(namespace("m", 4096)).await.unwrap();
    let mut seed = 100;
    let mut next_seed = || {
        seed += 1;
        seed
    };

    // Garbage bytes in a well-sized frame.
    let mut garbage = 5u32.to_le_bytes().to_vec();
    garbage.extend([0xff; 5]);
    expect_error_and_close(greeted(&d), &garbage, ErrorCode::Malformed);
    healthy(&d, &mut good, &ns, next_seed()).await;

    // Garbage before Hello too.
    expect_error_and_close(connect(&d), &garbage, ErrorCode::Malformed);

    // A length prefix far beyond the limit: refused before any body is buffered.
    let reason = expect_error_and_close(greeted(&d), &u32::MAX.to_le_bytes(), ErrorCode::FrameTooLarge);
    assert!(reason.contains("4294967295"), "{reason}");
    healthy(&d, &mut good, &ns, next_seed()).await;

    // A request with no op, and one with only a field this daemon does not know.
    expect_error_and_close(greeted(&d), &encode(&pb::Request { id: 3, op: None }), ErrorCode::UnknownOp);
    let unknown_field: &[u8] = &[0x08, 0x03, 0x98, 0x06, 0x01]; // id = 3, field 99 = 1
    let mut framed = (unknown_field.len() as u32).to_le_bytes().to_vec();
    framed.extend(unknown_field);
    expect_error_and_close(greeted(&d), &framed, ErrorCode::UnknownOp);
    healthy(&d, &mut good, &ns, next_seed()).await;

    // The same descriptor with another block size is another namespace (trust report: a first
    // registration with a wrong size locked every engine out of that descriptor).
    let mut s = greeted(&d);
    s.write_all(&request(2, Op::Register(pb::Register { namespace: Some(namespace("m", 8192)) }))).unwrap();
    let resp = read_response(&mut s);
    let Some(response::Result::Register(other)) = resp.result else { panic!("{resp:?}") };
    assert_ne!(other.namespace_id, ns.id, "a namespace of its own");
    let mut again = d.client("again").await;
    assert_eq!(again.register(namespace("m", 4096)).await.unwrap().id, ns.id, "the 4096-byte one is unaffected");
    let zero = request(2, Op::Register(pb::Register { namespace: Some(namespace("z", 0)) }));
    expect_error_and_close(greeted(&d), &zero, ErrorCode::WrongBlockSize);
    let huge = request(2, Op::Register(pb::Register { namespace: Some(namespace("h", 1 << 30)) }));
    expect_error_and_close(greeted(&d), &huge, ErrorCode::WrongBlockSize);
    healthy(&d, &mut good, &ns, next_seed()).await;

    // A namespace handle never registered on this connection (another client's handle 0 exists).
    let lookup = request(5, Op::Lookup(pb::Lookup { handle: 0, hashes: vec![vec![1u8; 16].into()] }));
    expect_error_and_close(greeted(&d), &lookup, ErrorCode::UnregisteredNamespace);
    healthy(&d, &mut good, &ns, next_seed()).await;

    // Ops before Hello, Hello twice.
    expect_error_and_close(connect(&d), &request(1, Op::Stats(pb::Stats {})), ErrorCode::NotHello);
    let hello = request(9, Op::Hello(pb::Hello { client_name: "x".into(), protocol_version: 1, engine: None }));
    expect_error_and_close(greeted(&d), &hello, ErrorCode::NotHello);
    let old = request(1, Op::Hello(pb::Hello { client_name: "x".into(), protocol_version: 0, engine: None }));
    expect_error_and_close(connect(&d), &old, ErrorCode::UnsupportedVersion);

    // An engine announced beyond its limits: an address too long, empty, too many model names.
    for engine in [
        pb::EngineInfo { address: "a".repeat(257), served_models: vec![] },
        pb::EngineInfo { address: String::new(), served_models: vec![] },
        pb::EngineInfo { address: "10.0.0.1:8000".into(), served_models: vec!["m".into(); 17] },
        pb::EngineInfo { address: "10.0.0.1:8000".into(), served_models: vec![String::new()] },
    ] {
        let hello =
            request(1, Op::Hello(pb::Hello { client_name: "x".into(), protocol_version: 1, engine: Some(engine) }));
        expect_error_and_close(connect(&d), &hello, ErrorCode::BadArgument);
    }

    // Bad hashes: empty and too long.
    for bad in [vec![], vec![7u8; 33]] {
        let mut s = greeted(&d);
        assert!(matches!(register(&mut s, 4096).result, Some(response::Result::Register(_))));
        let lookup = request(5, Op::Lookup(pb::Lookup { handle: 0, hashes: vec![vec![1u8; 8].into(), bad.into()] }));
        expect_error_and_close(s, &lookup, ErrorCode::BadArgument);
    }

    // Someone else's (or a made-up) reservation and lease.
    expect_error_and_close(greeted(&d), &request(4, Op::Commit(pb::Commit { reservation: 1 })), ErrorCode::UnknownId);
    expect_error_and_close(greeted(&d), &request(4, Op::Release(pb::Release { lease: 77 })), ErrorCode::UnknownId);

    // EOF in the middle of a frame.
    let mut s = greeted(&d);
    s.write_all(&[100, 0, 0, 0, 1, 2, 3]).unwrap();
    drop(s);

    healthy(&d, &mut good, &ns, next_seed()).await;
    assert!(d.is_running(), "{}", d.log());
    let metrics = d.http_get("/metrics");
    for code in [
        "MALFORMED",
        "FRAME_TOO_LARGE",
        "UNKNOWN_OP",
        "WRONG_BLOCK_SIZE",
        "UNREGISTERED_NAMESPACE",
        "NOT_HELLO",
        "BAD_ARGUMENT",
        "UNKNOWN_ID",
    ] {
        assert!(metrics.contains(&format!("kvtier_errors_total{{code=\"{code}\"}}")), "{code} not counted:\n{metrics}");
    }
    d.kill();
}

#[test]
fn an_allowlisted_uid_other_than_the_daemons_is_served() {
    let d = Daemon::start(&["--allowed-uid", "4242"]);
    let as_4242 = |args: &[&str]| d.kvtier_as(4242, args);
    let (ok, text) = as_4242(&["status"]);
    assert!(ok, "uid 4242 is allowlisted: {text}");
    assert!(text.contains("kvtierd"), "{text}");
    // Served, but not an administrator: its Discard is refused and nothing is removed.
    ok_stdout(&d.kvtier(&["put", "--count", "4"]));
    let (ok, text) = as_4242(&["discard", "--all"]);
    assert!(!ok && text.contains("admin request"), "{text}");
    for admin in [&["clients"][..], &["log-filter", "debug"]] {
        let (ok, text) = as_4242(admin);
        assert!(!ok && text.contains("admin request"), "{admin:?}: {text}");
    }
    assert!(ok_stdout(&d.kvtier(&["lookup", "--count", "4"])).contains("matched 4"));
    let root = ok_stdout(&d.kvtier(&["discard", "--all"]));
    assert!(root.contains("discarded 4 blocks"), "{root}");
}

#[test]
fn uid_outside_the_allowlist_is_refused_but_root_never_is() {
    // Trust report, weaker spots: an explicit allowlist locked out root and the daemon's uid.
    let d = Daemon::start(&["--allowed-uid", "4242"]);
    let (ok, text) = d.kvtier_as(4343, &["status"]);
    assert!(!ok && text.contains("PermissionDenied") && text.contains("uid 4343 is not allowed"), "{text}");
    assert!(ok_stdout(&d.kvtier(&["status"])).contains("kvtierd"), "root is always served");
}
