//! `kvtier picker`, the Gateway API Inference Extension's endpoint picker, driven over gRPC the
//! way Envoy's ext_proc filter drives it (FULL_DUPLEX_STREAMED request and response bodies):
//! real daemons hold a prompt's blocks for an engine announced on one node, and the picker
//! names that engine in the destination header and the `envoy.lb` metadata, honours the subset
//! hint, echoes bodies, answers 400/429/503 as the protocol says, and serves the health services.

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::service::ext_proc::v3 as ep;
use envoy_types::pb::google::protobuf::{value::Kind, Struct};
use ep::external_processor_client::ExternalProcessorClient;
use ep::processing_request::Request as In;
use ep::processing_response::Response as Out;
use kvtier_core::block_key::request_keys;
use kvtier_gateway::ext_proc::{string_list, DESTINATION, SUBSET_KEY, SUBSET_NAMESPACE};
use kvtier_proto::v1 as pb;
use kvtier_tests::{eventually_within, free_local_addr, http_get, namespace, Daemon, KvtierProc};
use std::collections::HashMap;
use tokio_stream::StreamExt;

const BLOCK: u64 = 16 * 1024;
const ENGINE_A: &str = "127.0.0.1:7001";
const ENGINE_B: &str = "127.0.0.1:7002";

fn tokens() -> Vec<u32> {
    (100..132).collect()
}

fn descriptor() -> kvtier_client::NamespaceDescriptor {
    kvtier_client::NamespaceDescriptor { tokens_per_block: 4, ..namespace("m", BLOCK) }
}

/// An engine connection on `d` announcing `address`; with `blocks`, it saves that many blocks
/// of the prompt under the keys its connector would use.
async fn engine(d: &Daemon, address: &str, blocks: usize) -> kvtier_client::Client {
    let info = pb::EngineInfo { address: address.into(), served_models: vec!["m".into()] };
    let mut c = kvtier_client::Client::connect_as(&d.socket, "engine", Some(info)).await.unwrap();
    let ns = c.register(descriptor()).await.unwrap();
    let keys: Vec<bytes::Bytes> = request_keys(&tokens(), 4, "")
        .iter()
        .take(blocks)
        .map(|k| bytes::Bytes::copy_from_slice(k.as_bytes()))
        .collect();
    let data = kvtier_tests::blocks_for(&keys, BLOCK as usize);
    c.save(&ns, &keys, &kvtier_tests::refs(&data)).await.unwrap();
    c
}

fn header(k: &str, v: &str) -> HeaderValue {
    HeaderValue { key: k.into(), raw_value: v.as_bytes().to_vec(), ..Default::default() }
}

fn headers(path: &str, method: &str, end_of_stream: bool, metadata: Option<Metadata>) -> ep::ProcessingRequest {
    let headers = HeaderMap { headers: vec![header(":path", path), header(":method", method)] };
    let h = ep::HttpHeaders { headers: Some(headers), end_of_stream, ..Default::default() };
    ep::ProcessingRequest { request: Some(In::RequestHeaders(h)), metadata_context: metadata, ..Default::default() }
}

fn body(data: &[u8], end_of_stream: bool, response: bool) -> ep::ProcessingRequest {
    let b = ep::HttpBody { body: data.to_vec(), end_of_stream, ..Default::default() };
    let r = if response { In::ResponseBody(b) } else { In::RequestBody(b) };
    ep::ProcessingRequest { request: Some(r), ..Default::default() }
}

fn subset(endpoints: &[&str]) -> Metadata {
    let hint = Struct { fields: HashMap::from([(SUBSET_KEY.to_string(), string_list(endpoints))]) };
    Metadata { filter_metadata: HashMap::from([(SUBSET_NAMESPACE.to_string(), hint)]), ..Default::default() }
}

fn completion() -> Vec<u8> {
    serde_json::json!({"model": "m", "prompt": tokens(), "max_tokens": 4}).to_string().into_bytes()
}

/// One request through the picker as Envoy sends it: headers, the body in two chunks, and
/// (when `respond`) a streamed response. Returns every message the picker sent.
async fn exchange(
    addr: &str,
    metadata: Option<Metadata>,
    body_bytes: &[u8],
    respond: bool,
) -> Vec<ep::ProcessingResponse> {
    let mut c = ExternalProcessorClient::connect(format!("http://{addr}")).await.unwrap();
    let half = body_bytes.len() / 2;
    let mut msgs = vec![
        headers("/v1/completions", "POST", false, metadata),
        body(&body_bytes[..half], false, false),
        body(&body_bytes[half..], true, false),
    ];
    if respond {
        let h = ep::HttpHeaders { end_of_stream: false, ..Default::default() };
        msgs.push(ep::ProcessingRequest { request: Some(In::ResponseHeaders(h)), ..Default::default() });
        msgs.push(body(b"data: {\"x\":1}\n\n", false, true));
        msgs.push(body(b"data: [DONE]\n\n", true, true));
    }
    let expected = if respond { 5 } else { 2 };
    let mut out = Vec::new();
    let mut stream = c.process(tokio_stream::iter(msgs)).await.unwrap().into_inner();
    while out.len() < expected {
        match stream.next().await {
            Some(Ok(r)) => {
                let immediate = matches!(r.response, Some(Out::ImmediateResponse(_)));
                out.push(r);
                if immediate {
                    break;
                }
            }
            _ => break,
        }
    }
    out
}

/// The destination header and the `envoy.lb` metadata value of a pick.
fn destination(r: &ep::ProcessingResponse) -> (String, String) {
    let Some(Out::RequestHeaders(h)) = &r.response else { panic!("not a headers answer: {r:?}") };
    let common = h.response.as_ref().unwrap();
    assert!(common.clear_route_cache);
    let set = &common.header_mutation.as_ref().unwrap().set_headers;
    let header = set.iter().filter_map(|o| o.header.as_ref()).find(|h| h.key == DESTINATION).unwrap();
    let lb = &r.dynamic_metadata.as_ref().unwrap().fields["envoy.lb"];
    let Some(Kind::StructValue(lb)) = &lb.kind else { panic!() };
    let Some(Kind::StringValue(meta)) = &lb.fields[DESTINATION].kind else { panic!() };
    (String::from_utf8(header.raw_value.clone()).unwrap(), meta.clone())
}

fn status(r: &ep::ProcessingResponse) -> i32 {
    match &r.response {
        Some(Out::ImmediateResponse(i)) => i.status.unwrap().code,
        other => panic!("not an immediate response: {other:?}"),
    }
}

fn echoed(rs: &[ep::ProcessingResponse], request: bool) -> (Vec<u8>, bool) {
    let mut data = Vec::new();
    let mut end = false;
    for r in rs {
        let b = match (&r.response, request) {
            (Some(Out::RequestBody(b)), true) | (Some(Out::ResponseBody(b)), false) => b,
            _ => continue,
        };
        let m = b.response.as_ref().unwrap().body_mutation.as_ref().unwrap().mutation.as_ref().unwrap();
        let ep::body_mutation::Mutation::StreamedResponse(s) = m else { panic!("not streamed: {m:?}") };
        data.extend_from_slice(&s.body);
        end = s.end_of_stream;
    }
    (data, end)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_picker_speaks_the_endpoint_picker_protocol() {
    let (d0, d1) = (Daemon::start(&[]), Daemon::start(&[]));
    let _a = engine(&d0, ENGINE_A, 0).await;
    let _b = engine(&d1, ENGINE_B, 8).await;
    let (addr, health, metrics) = (free_local_addr(), free_local_addr(), free_local_addr());
    #[rustfmt::skip]
    let picker = KvtierProc::start(&[
        "picker", "--listen", &addr, "--health-listen", &health, "--metrics-listen", &metrics,
        "--daemon", &d0.grpc, "--daemon", &d1.grpc, "--engine", ENGINE_A, "--engine", ENGINE_B,
    ], &addr);

    // Once the feed has the blocks, the engine on the node holding them is picked: header and
    // metadata alike, the other engine as the fallback; the body comes back unchanged, after
    // the headers answer.
    let req = completion();
    let mut picked = Vec::new();
    eventually_within("the picker names engine B, again and again (equal ones would alternate)", 20, || {
        (0..4).all(|_| {
            picked = kvtier_tests::block_on(exchange(&addr, None, &req, true));
            destination(&picked[0]).0.starts_with(ENGINE_B)
        })
    });
    let (header, meta) = destination(&picked[0]);
    assert_eq!(header, meta, "header and metadata must not differ");
    assert_eq!(header, format!("{ENGINE_B},{ENGINE_A}"));
    assert_eq!(echoed(&picked, true), (req.clone(), true));
    assert!(matches!(picked[2].response, Some(Out::ResponseHeaders(_))));
    assert_eq!(echoed(&picked, false), (b"data: {\"x\":1}\n\ndata: [DONE]\n\n".to_vec(), true));

    // The subset hint limits the pick, even away from the prefix; an empty one is a 503.
    let only_a = exchange(&addr, Some(subset(&[ENGINE_A])), &req, false).await;
    assert_eq!(destination(&only_a[0]).0, ENGINE_A);
    assert_eq!(status(&exchange(&addr, Some(subset(&[])), &req, false).await[0]), 503);

    // A malformed body is a 400 with the reason.
    let bad = exchange(&addr, None, br#"{"prompt": [1, 2]}"#, false).await;
    assert_eq!(status(&bad[0]), 400);

    // A request without a body is answered on its headers.
    let mut c = ExternalProcessorClient::connect(format!("http://{addr}")).await.unwrap();
    let mut s =
        c.process(tokio_stream::iter(vec![headers("/v1/models", "GET", true, None)])).await.unwrap().into_inner();
    let models = s.next().await.unwrap().unwrap();
    assert!(!destination(&models).0.is_empty());
    drop(s);

    // A picker allowing one request in flight per engine, with one on each (streams whose
    // responses have not ended): the next is shed with a 429.
    let shedding = free_local_addr();
    #[rustfmt::skip]
    let _shedding = KvtierProc::start(&[
        "picker", "--listen", &shedding, "--health-listen", "", "--metrics-listen", "",
        "--daemon", &d0.grpc, "--engine", ENGINE_A, "--engine", ENGINE_B, "--max-in-flight", "1",
    ], &shedding);
    let mut held = Vec::new();
    for only in [ENGINE_A, ENGINE_B] {
        let mut c = ExternalProcessorClient::connect(format!("http://{shedding}")).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        for m in [headers("/v1/completions", "POST", false, Some(subset(&[only]))), body(&req, true, false)] {
            tx.send(m).await.unwrap();
        }
        let mut s = c.process(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
        assert_eq!(destination(&s.next().await.unwrap().unwrap()).0, only);
        held.push((tx, s, c));
    }
    assert_eq!(status(&exchange(&shedding, None, &req, false).await[0]), 429);
    drop(held);

    // The health services the protocol names, and the decisions in the metrics.
    for service in ["liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"] {
        let channel = kvtier_router::feed::channel(&health).await.unwrap();
        let mut h = tonic_health::pb::health_client::HealthClient::new(channel);
        let r = h.check(tonic_health::pb::HealthCheckRequest { service: service.into() }).await.unwrap();
        assert_eq!(r.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    }
    let text = http_get(&metrics, "/metrics").unwrap();
    assert!(text.contains("kvtier_gateway_decisions_total{reason=\"prefix\"}"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("kvtier_gateway_decisions_total{reason=\"bad-request\"} 1")), "{text}");
    drop(picker);
}
