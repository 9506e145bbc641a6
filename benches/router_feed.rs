//! The router feed and the router's decision, each next to its reference in the same run:
//! - gRPC `Lookup` of 256 hashes over TCP and over the unix socket: latency (sequential) and
//!   throughput (4 clients, 16 queries per request), next to an empty gRPC call (`Health`) on the
//!   same channel and to the connector socket's own lookup;
//! - the router's decision (`score` + `pick`) for a 256-block request with 16 nodes and 1 M
//!   indexed blocks, next to the bare hash-table probes of the same 256 blocks;
//! - the global index's memory per block.
//!
//! `cargo build --release --bins && cargo bench -p kvtier-benches --bench router_feed`

use kvtier_client::{testdata, Bytes};
use kvtier_core::block::BlockHash;
use kvtier_core::cache::TierKind;
use kvtier_proto::v1 as pb;
use kvtier_proto::v1::cache_service_client::CacheServiceClient;
use kvtier_router::feed::channel;
use kvtier_router::index::GlobalIndex;
use kvtier_router::score::{pick, score, NodeView, Weights};
use kvtier_tests::{namespace, Daemon};
use std::time::{Duration, Instant};

const N: usize = 5_000;

fn pct(mut v: Vec<Duration>) -> [f64; 3] {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1e6;
    [at(0.5), at(0.99), at(0.999)]
}

async fn timed<F: std::future::Future<Output = ()>>(n: usize, mut f: impl FnMut() -> F) -> Vec<Duration> {
    for _ in 0..n / 10 {
        f().await;
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f().await;
        v.push(t.elapsed());
    }
    v
}

fn row(what: &str, p: [f64; 3]) {
    println!("  {what:<44} {:>9.1} {:>9.1} {:>9.1}", p[0], p[1], p[2]);
}

async fn grpc_lookups(addr: &str, label: &str, query: &pb::PrefixQuery) {
    let mut c = CacheServiceClient::new(channel(addr).await.unwrap());
    let one = pb::BatchLookupRequest { queries: vec![query.clone()] };
    let health = timed(N, || {
        let mut c = c.clone();
        async move {
            c.health(pb::HealthRequest {}).await.unwrap();
        }
    })
    .await;
    let lookup = timed(N, || {
        let (mut c, req) = (c.clone(), one.clone());
        async move {
            assert_eq!(c.lookup(req).await.unwrap().into_inner().matches[0].matched, 256);
        }
    })
    .await;
    row(&format!("{label}: empty call (Health, reference)"), pct(health));
    row(&format!("{label}: Lookup of 256 hashes"), pct(lookup));
    // Throughput: 4 concurrent clients, 16 prefixes of 256 blocks per request.
    let batch = pb::BatchLookupRequest { queries: vec![query.clone(); 16] };
    let t = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (mut c, req) = (c.clone(), batch.clone());
            tokio::spawn(async move {
                for _ in 0..N / 8 {
                    c.lookup(req.clone()).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    let requests = 4.0 * (N / 8) as f64;
    println!(
        "  {label}: throughput {:.0} requests/s = {:.0} prefix lookups/s = {:.1} M blocks/s",
        requests / secs,
        requests * 16.0 / secs,
        requests * 16.0 * 256.0 / secs / 1e6
    );
    let _ = &mut c;
}

fn router_decision() {
    const NODES: usize = 16;
    const BLOCKS: usize = 1 << 20;
    let ns = [3u8; 16];
    let mut index = GlobalIndex::new(usize::MAX);
    // 1 M distinct blocks in prompts of 256, each prompt on 1 to 3 nodes, some on disk.
    let prompts = BLOCKS / 256;
    for p in 0..prompts {
        for b in 0..256 {
            let hash = BlockHash::from_u64((p * 256 + b) as u64);
            for k in 0..1 + p % 3 {
                let tier = if b % 5 == 4 { TierKind::Disk } else { TierKind::Host };
                index.set(((p + k * 5) % NODES) as u8, &ns, hash, Some(tier));
            }
        }
    }
    let per_block = index.heap_bytes() as f64 / index.len() as f64;
    let views: Vec<NodeView> =
        (0..NODES).map(|i| NodeView { node: i as u8, load: (i % 4) as f64, healthy: true }).collect();
    let requests: Vec<Vec<BlockHash>> = (0..1000)
        .map(|r| {
            let p = (r * 7919) % prompts;
            let held = 64 + r % 192; // a held prefix, then new blocks
            (0..256)
                .map(|b| BlockHash::from_u64(if b < held { (p * 256 + b) as u64 } else { u64::MAX - b as u64 }))
                .collect()
        })
        .collect();
    let w = Weights::default();
    let mut decide = Vec::new();
    let mut probe = Vec::new();
    let reference: hashbrown::HashSet<(u16, BlockHash)> =
        (0..BLOCKS).map(|i| (0u16, BlockHash::from_u64(i as u64))).collect();
    for round in 0..20 {
        for (i, hashes) in requests.iter().enumerate() {
            let t = Instant::now();
            let s = score(&index, &ns, hashes, &views, &w);
            std::hint::black_box(pick(&s, i));
            decide.push(t.elapsed());
            let t = Instant::now();
            std::hint::black_box(hashes.iter().take_while(|h| reference.contains(&(0, **h))).count());
            probe.push(t.elapsed());
        }
        if round == 0 {
            decide.clear();
            probe.clear();
        }
    }
    println!(
        "router decision, {NODES} nodes, {} blocks indexed, 256-block requests (p50 / p99 / p99.9 us)",
        index.len()
    );
    row("score + pick", pct(decide.clone()));
    row("reference: 256 hash-set probes, no scoring", pct(probe.clone()));
    println!("  index memory: {per_block:.1} bytes per block ({} MiB)", index.heap_bytes() >> 20);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let d = Daemon::start(&["--pool-bytes", "64 MiB", "--slab-bytes", "1 MiB"]);
    let mut c = d.client("bench-feed").await;
    let ns = c.register(namespace("bench-feed", 4096)).await.unwrap();
    let hashes: Vec<Bytes> =
        testdata::chained_hashes(1, 256).into_iter().map(|h| Bytes::from([&h[..], &h[..]].concat())).collect();
    let blocks: Vec<Vec<u8>> = hashes.iter().map(|h| testdata::block(h, 4096)).collect();
    c.save(&ns, &hashes, &blocks.iter().map(|b| &b[..]).collect::<Vec<_>>()).await.unwrap();
    let mut connector = Vec::with_capacity(N);
    for i in 0..N + N / 10 {
        let t = Instant::now();
        assert_eq!(c.lookup(&ns, &hashes).await.unwrap(), 256);
        if i >= N / 10 {
            connector.push(t.elapsed());
        }
    }
    println!("router feed: {N} sequential requests each after warm-up (p50 / p99 / p99.9 us)");
    row("connector socket: Lookup of 256 hashes (reference)", pct(connector));
    let query = pb::PrefixQuery { namespace_id: ns.id.clone(), hashes: hashes.clone() };
    grpc_lookups(&d.grpc, "gRPC TCP", &query).await;
    let uds = format!("unix:{}", d.dir.path().join("grpc.sock").display());
    grpc_lookups(&uds, "gRPC UDS", &query).await;
    router_decision();
}
