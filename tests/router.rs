//! The router feed and the cluster router with real daemons and a real `kvtier router` process:
//! routing to the node holding the prefix, resuming a cut event stream without losing an event,
//! re-syncing with a restarted daemon, expiring a dead one, and a slow consumer that cannot make
//! the daemon grow.

use bytes::Bytes;
use kvtier_client::testdata;
use kvtier_proto::v1 as pb;
use kvtier_proto::v1::cache_service_client::CacheServiceClient;
use kvtier_proto::v1::router_service_client::RouterServiceClient;
use kvtier_router::feed::channel;
use kvtier_tests::{eventually_within, namespace, ok_stdout, Daemon, RouterProc, TcpProxy};

const BLOCK: u64 = 16 * 1024;

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// Saves prompt `seed` of `n` blocks on `d`; returns the namespace id and the hashes.
async fn save(d: &Daemon, seed: u64, n: usize) -> (Bytes, Vec<Bytes>) {
    let mut c = d.client("router-test").await;
    let ns = c.register(namespace("router-test", BLOCK)).await.unwrap();
    let hashes = testdata::chained_hashes(seed, n);
    let blocks: Vec<Vec<u8>> = hashes.iter().map(|h| testdata::block(h, BLOCK as usize)).collect();
    c.save(&ns, &hashes, &blocks.iter().map(|b| &b[..]).collect::<Vec<_>>()).await.unwrap();
    (ns.id.clone(), hashes)
}

async fn route(r: &RouterProc, ns: &Bytes, hashes: &[Bytes]) -> pb::RouteResponse {
    let mut c = RouterServiceClient::new(channel(&r.addr).await.unwrap());
    let req = pb::RouteRequest { namespace_id: ns.clone(), hashes: hashes.to_vec() };
    c.route(req).await.unwrap().into_inner()
}

async fn scores(r: &RouterProc, ns: &Bytes, hashes: &[Bytes]) -> Vec<pb::EndpointScore> {
    let mut c = RouterServiceClient::new(channel(&r.addr).await.unwrap());
    let req = pb::RouteRequest { namespace_id: ns.clone(), hashes: hashes.to_vec() };
    c.score(req).await.unwrap().into_inner().endpoints
}

/// What the daemon itself says it holds of the prompt (its own gRPC Lookup).
async fn held(d: &Daemon, ns: &Bytes, hashes: &[Bytes]) -> u32 {
    let mut c = CacheServiceClient::new(channel(&d.grpc).await.unwrap());
    let q = pb::PrefixQuery { namespace_id: ns.clone(), hashes: hashes.to_vec() };
    c.lookup(pb::BatchLookupRequest { queries: vec![q] }).await.unwrap().into_inner().matches[0].matched
}

fn router_sees(r: &RouterProc, endpoint: &str, ns: &Bytes, hashes: &[Bytes], want: u32) -> bool {
    block_on(scores(r, ns, hashes)).iter().any(|e| e.endpoint == endpoint && e.matched_blocks == want)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_saved_on_one_daemon_draw_its_prefix_there() {
    let ds: Vec<Daemon> = (0..3).map(|_| Daemon::start(&[])).collect();
    let r = RouterProc::start(&ds.iter().map(|d| d.grpc.as_str()).collect::<Vec<_>>(), &[]);
    let (ns, hashes) = save(&ds[1], 1, 32).await;
    eventually_within("the router picks daemon 2", 20, || {
        let res = block_on(route(&r, &ns, &hashes));
        res.endpoint == ds[1].grpc && res.reason == "prefix" && res.matched_blocks == 32
    });
    // A longer request sharing the prefix goes there too; an unknown one goes somewhere.
    let mut longer = hashes.clone();
    longer.extend(testdata::chained_hashes(99, 8));
    assert_eq!(route(&r, &ns, &longer).await.endpoint, ds[1].grpc);
    let unknown = route(&r, &ns, &testdata::chained_hashes(7, 4)).await;
    assert_eq!(unknown.reason, "least-loaded");
    assert!(ds.iter().any(|d| d.grpc == unknown.endpoint), "{unknown:?}");
    assert!(r.metric("kvtier_router_index_blocks") >= 32.0);

    // An operator discards the model on daemon 2: routers stop sending its prefix there.
    let out = ok_stdout(&ds[1].kvtier(&["discard", "--model", "router-test"]));
    assert!(out.contains("discarded 32 blocks"), "{out}");
    eventually_within("the router forgets the discarded blocks", 20, || router_sees(&r, &ds[1].grpc, &ns, &hashes, 0));
    assert_eq!(route(&r, &ns, &hashes).await.reason, "least-loaded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_streams_resume_from_their_sequence_and_converge() {
    // Small pools, so saves evict: the streams carry removals as well as stores.
    let ds: Vec<Daemon> = (0..2).map(|_| Daemon::start(&["--pool-bytes", "4 MiB", "--slab-bytes", "1 MiB"])).collect();
    let proxies: Vec<TcpProxy> = ds.iter().map(|d| TcpProxy::start(&d.grpc)).collect();
    let r = RouterProc::start(&proxies.iter().map(|p| p.addr.as_str()).collect::<Vec<_>>(), &[]);
    eventually_within("the router follows both daemons", 20, || r.metric("kvtier_router_snapshots_total") == 2.0);
    let mut prompts = Vec::new();
    for seed in 0..30u64 {
        let i = (seed % 2) as usize;
        prompts.push((i, save(&ds[i], seed, 40).await));
        if seed % 7 == 3 {
            // Cut while the router follows, then save on while it reconnects: those events
            // wait in the daemon's log for the resumed stream.
            let resumed = r.metric("kvtier_router_resumes_total");
            proxies[i].cut();
            prompts.push((i, save(&ds[i], 1000 + seed, 40).await));
            eventually_within("the router reconnects", 20, || r.metric("kvtier_router_resumes_total") > resumed);
        }
    }
    // Every prompt, asked of every daemon: the router's view equals the daemon's own Lookup.
    for (_, (ns, hashes)) in &prompts {
        for (d, p) in ds.iter().zip(&proxies) {
            let truth = held(d, ns, hashes).await;
            eventually_within("the router's view equals the daemon's", 20, || {
                router_sees(&r, &p.addr, ns, hashes, truth)
            });
        }
    }
    assert!(prompts.iter().any(|(i, (ns, h))| block_on(held(&ds[*i], ns, h)) < 40), "evictions happened");
    assert_eq!(r.metric("kvtier_router_snapshots_total"), 2.0, "one snapshot per daemon, then only resumes");
    assert_eq!(r.metric("kvtier_router_resyncs_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_are_found_by_dns() {
    let d = Daemon::start(&[]);
    let port = d.grpc.rsplit(':').next().unwrap();
    let r = RouterProc::start(&[], &["--dns", &format!("localhost:{port}"), "--dns-interval-secs", "1"]);
    let (ns, hashes) = save(&d, 1, 8).await;
    eventually_within("the router found the daemon by name", 20, || {
        let res = block_on(route(&r, &ns, &hashes));
        res.endpoint == d.grpc && res.reason == "prefix"
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_is_resynced_and_a_dead_one_expires() {
    let mut a = Daemon::start(&[]);
    let b = Daemon::start(&[]);
    let r = RouterProc::start(&[&a.grpc, &b.grpc], &["--expiry-secs", "2"]);
    let (ns, hashes) = save(&a, 1, 16).await;
    eventually_within("the router knows a's blocks", 20, || router_sees(&r, &a.grpc, &ns, &hashes, 16));

    // Restarted (host tier lost): the router notices the new instance and re-snapshots.
    a.restart();
    eventually_within("a's old blocks are gone from the router", 20, || router_sees(&r, &a.grpc, &ns, &hashes, 0));
    let (ns2, hashes2) = save(&a, 2, 8).await;
    // Seen in its scores, not just picked: a pick by load alone could name it too.
    eventually_within("and its new ones are known", 20, || router_sees(&r, &a.grpc, &ns2, &hashes2, 8));

    // Gone for good: after the expiry it is unhealthy, forgotten, and never picked.
    a.kill();
    eventually_within("a expires", 20, || {
        block_on(scores(&r, &ns2, &hashes2)).iter().any(|e| e.endpoint == a.grpc && !e.healthy && e.matched_blocks == 0)
    });
    for _ in 0..5 {
        let res = route(&r, &ns2, &hashes2).await;
        assert_eq!((res.endpoint.as_str(), res.reason.as_str()), (b.grpc.as_str(), "least-loaded"));
    }
    assert!(r.metric("kvtier_router_expirations_total") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_cannot_grow_the_daemon() {
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(cfg.path(), "[grpc]\nevent_capacity = 2000\n").unwrap();
    let d =
        Daemon::start(&["--pool-bytes", "8 MiB", "--slab-bytes", "1 MiB", "--config", cfg.path().to_str().unwrap()]);
    let mut c = CacheServiceClient::new(channel(&d.grpc).await.unwrap());
    let mut stream = c.watch_events(pb::WatchEventsRequest::default()).await.unwrap().into_inner();
    // Never read while ~60,000 events happen (saves through a pool that holds 500 blocks).
    let (_, _) = save(&d, 0, 10).await;
    let before = d.rss_kib();
    for seed in 1..=300 {
        save(&d, seed, 100).await;
    }
    let grown = d.rss_kib().saturating_sub(before);
    assert!(grown < 32 * 1024, "daemon grew by {grown} KiB for an unread stream");
    // Reading now: the snapshot, what fit in the buffers, then "re-snapshot".
    let mut saw_resync = false;
    while let Some(msg) = stream.message().await.unwrap() {
        if let Some(pb::watch_events_response::Payload::ResyncRequired(r)) = msg.payload {
            assert!(r.oldest_retained > 1);
            saw_resync = true;
            break;
        }
    }
    assert!(saw_resync, "the consumer that fell behind is told to re-snapshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_feed_requests_get_clear_errors_and_the_daemon_carries_on() {
    let d = Daemon::start(&[]);
    let (ns, hashes) = save(&d, 1, 4).await;
    let mut c = CacheServiceClient::new(channel(&d.grpc).await.unwrap());
    let bad = [
        (vec![pb::PrefixQuery { namespace_id: Bytes::from_static(b"short"), hashes: hashes.clone() }], "namespace_id"),
        (vec![pb::PrefixQuery { namespace_id: ns.clone(), hashes: vec![Bytes::from(vec![0u8; 33])] }], "hash 0"),
        (vec![pb::PrefixQuery { namespace_id: ns.clone(), hashes: vec![] }; 1025], "1025 queries"),
    ];
    for (queries, why) in bad {
        let err = c.lookup(pb::BatchLookupRequest { queries }).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(why), "{err:?}");
    }
    // A namespace nobody registered is simply not held; the same channel keeps working.
    let q = pb::PrefixQuery { namespace_id: Bytes::from(vec![9u8; 16]), hashes: hashes.clone() };
    assert_eq!(c.lookup(pb::BatchLookupRequest { queries: vec![q] }).await.unwrap().into_inner().matches[0].matched, 0);
    assert_eq!(held(&d, &ns, &hashes).await, 4);
    // Prefetch: the same checks, a bound on its length, and nothing to do for an unknown namespace.
    let short = pb::PrefixQuery { namespace_id: Bytes::from_static(b"short"), hashes: hashes.clone() };
    assert!(c.prefetch(short).await.unwrap_err().message().contains("namespace_id"));
    let long = pb::PrefixQuery { namespace_id: ns.clone(), hashes: testdata::chained_hashes(5, 8193) };
    assert!(c.prefetch(long).await.unwrap_err().message().contains("8193 hashes"));
    let q = pb::PrefixQuery { namespace_id: Bytes::from(vec![9u8; 16]), hashes: hashes.clone() };
    assert_eq!(c.prefetch(q).await.unwrap().into_inner().promoting, 0);
    let router = RouterProc::start(&[&d.grpc], &[]);
    let mut r = RouterServiceClient::new(channel(&router.addr).await.unwrap());
    let err = r.route(pb::RouteRequest { namespace_id: Bytes::from_static(b"x"), hashes: vec![] }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

/// Tiers of the held prefix of `hashes` on `d` (its own gRPC Lookup).
async fn tiers(d: &Daemon, ns: &Bytes, hashes: &[Bytes]) -> Vec<i32> {
    let mut c = CacheServiceClient::new(channel(&d.grpc).await.unwrap());
    let q = pb::PrefixQuery { namespace_id: ns.clone(), hashes: hashes.to_vec() };
    c.lookup(pb::BatchLookupRequest { queries: vec![q] }).await.unwrap().into_inner().matches.remove(0).tiers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_routed_to_its_disk_is_read_back_before_the_request_arrives() {
    // A 4 MiB pool over a disk tier: a prompt saved first ends up on disk only once others follow.
    let spill = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap(); // O_DIRECT: not tmpfs
    let disk = ["--disk-dir", spill.path().to_str().unwrap(), "--disk-bytes-per-dir", "64 MiB"];
    let flags = [&disk[..], &["--disk-admission", "always", "--pool-bytes", "4 MiB", "--slab-bytes", "1 MiB"]].concat();
    let d = Daemon::start_with_metrics(&flags, true);
    let (ns, hashes) = save(&d, 1, 32).await;
    for seed in 2..12 {
        save(&d, seed, 32).await;
    }
    let disk_only = pb::Tier::Disk as i32;
    eventually_within("the first prompt is on disk only", 60, || {
        block_on(tiers(&d, &ns, &hashes)) == vec![disk_only; 32]
    });

    // Without prefetching, routing changes nothing there.
    let quiet = RouterProc::start(&[d.grpc.as_str()], &["--prefetch", "false"]);
    eventually_within("the router sees the prefix on disk", 20, || {
        block_on(scores(&quiet, &ns, &hashes)).iter().any(|e| e.matched_blocks == 32 && e.host_blocks == 0)
    });
    assert_eq!(route(&quiet, &ns, &hashes).await.matched_blocks, 32);
    let metrics = kvtier_tests::http_get(&quiet.metrics, "/metrics").unwrap();
    assert!(metrics.contains("kvtier_router_prefetches_total{outcome=\"sent\"} 0"), "{metrics}");

    // The default router has the chosen daemon read it back into memory.
    let r = RouterProc::start(&[d.grpc.as_str()], &[]);
    eventually_within("the router sees the prefix on disk", 20, || {
        block_on(scores(&r, &ns, &hashes)).iter().any(|e| e.matched_blocks == 32 && e.host_blocks == 0)
    });
    let res = route(&r, &ns, &hashes).await;
    assert_eq!((res.endpoint.as_str(), res.matched_blocks), (d.grpc.as_str(), 32));
    eventually_within("the prefix is back in the host tier", 30, || {
        block_on(tiers(&d, &ns, &hashes)) == vec![pb::Tier::Host as i32; 32]
    });
    assert!(d.metric("kvtier_disk_promoted_blocks_total") >= 32.0);
    eventually_within("the prefetch counted", 10, || {
        kvtier_tests::http_get(&r.metrics, "/metrics")
            .is_some_and(|m| m.contains("kvtier_router_prefetches_total{outcome=\"sent\"} 1"))
    });
    // Bytes promoted ahead are the bytes saved.
    let mut c = d.client("router-test").await;
    let handle = c.register(namespace("router-test", BLOCK)).await.unwrap();
    let mut got = Vec::new();
    c.load(&handle, &hashes, |_, b| got.push(b.to_vec())).await.unwrap();
    let want: Vec<Vec<u8>> = hashes.iter().map(|h| testdata::block(h, BLOCK as usize)).collect();
    assert_eq!(got, want);
}
