//! The connector's frame decoder and request dispatch, on a real in-process `Node` (16 MiB pool,
//! host backend: nothing copies engine memory): any byte stream a client sends after Hello is
//! decoded and served until a fatal error, then the connection is dropped. Invariants: no panic,
//! and once the client is gone it holds nothing (no reservation, no pin, no registration).

#![no_main]

use kvtier_daemon::clients::ConnectionLimits;
use kvtier_daemon::config::Config;
use kvtier_daemon::node::Node;
use kvtier_daemon::server::dispatch::{dispatch, Session};
use kvtier_proto::frame::FrameDecoder;
use kvtier_proto::v1::{request::Op, Hello, Request};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use std::sync::{Arc, OnceLock};

fn node() -> &'static (Arc<Node>, tokio::runtime::Runtime) {
    static NODE: OnceLock<(Arc<Node>, tokio::runtime::Runtime)> = OnceLock::new();
    NODE.get_or_init(|| {
        let mut c = Config::from_toml(
            "[pool]\nbytes = \"16 MiB\"\nslab_bytes = \"1 MiB\"\nallow_unlocked = true\n\
             [server]\nstaging_bytes = \"2 MiB\"\nmax_namespaces = 32\n[device]\nbackend = \"host\"\n\
             [grpc]\nsocket = \"\"\n[metrics]\nlisten = \"\"\n",
        )
        .expect("fuzz config");
        c.server.socket = std::env::temp_dir().join("kvtier-fuzz.sock");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        (Arc::new(Node::new(c).expect("node")), rt)
    })
}

fuzz_target!(|data: &[u8]| {
    let (node, rt) = node();
    let Some((&flags, stream)) = data.split_first() else { return };
    let registered = node
        .clients
        .connections
        .open(node.new_client(), Some(std::process::id() as i32), 0, ConnectionLimits::NONE)
        .unwrap();
    let mut session = Session::new(Arc::clone(&registered.record), false, flags & 1 == 1);
    let client = session.client;
    let mut decoder = FrameDecoder::new(64 << 10);
    decoder.extend(stream);
    rt.block_on(async {
        let hello = Op::Hello(Hello { client_name: "fuzz".into(), protocol_version: 1, engine: None });
        if flags & 2 == 0 && dispatch(node, &mut session, hello).await.is_err() {
            return;
        }
        while let Ok(Some(body)) = decoder.next_frame() {
            let Ok(Request { op: Some(op), .. }) = Request::decode(&body[..]) else { return };
            if dispatch(node, &mut session, op).await.is_err() {
                return;
            }
        }
    });
    rt.block_on(session.settle());
    drop(session);
    node.disconnect(client);
    let c = node.cache_view();
    assert_eq!(c.held_by(client), 0, "a gone client holds nothing");
    assert!(c.attached(client).is_empty(), "nor keeps a namespace registered");
    assert_eq!(c.stats().reserved_blocks, 0, "its reservations are aborted");
    assert!(c.stats().used_bytes <= c.stats().capacity_bytes);
});
