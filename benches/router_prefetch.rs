//! Router prefetch: how long an engine's load (every block copied out of the pool) of a prompt
//! its node holds only on disk takes,
//! cold (the load waits for the disk reads) and when the router's Route had the daemon start
//! reading it back a head start earlier (the time a request takes from the router to the
//! engine's load: HTTP, queueing, scheduling). References in the same run: the same load from
//! the host tier (the best a prefetch can do) and the cold load; ratios printed.
//!
//! `cargo build --release --bins && cargo bench -p kvtier-benches --bench router_prefetch`

use kvtier_client::testdata;
use kvtier_proto::v1 as pb;
use kvtier_proto::v1::cache_service_client::CacheServiceClient;
use kvtier_proto::v1::router_service_client::RouterServiceClient;
use kvtier_router::feed::channel;
use kvtier_tests::{namespace, Daemon, RouterProc};
use std::time::{Duration, Instant};

/// Block size and blocks of the prompt (32 MiB of KV).
const BLOCK: u64 = 1 << 20;
const BLOCKS: usize = 32;
/// Rounds per row; the median is printed.
const ROUNDS: usize = 5;

/// Tiers of the held prefix of `hashes` on `d`.
async fn tiers(d: &Daemon, ns: &bytes::Bytes, hashes: &[bytes::Bytes]) -> Vec<i32> {
    let mut c = CacheServiceClient::new(channel(&d.grpc).await.unwrap());
    let q = pb::PrefixQuery { namespace_id: ns.clone(), hashes: hashes.to_vec() };
    c.lookup(pb::BatchLookupRequest { queries: vec![q] }).await.unwrap().into_inner().matches.remove(0).tiers
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// One round: pushes the prompt to disk only (saving prompts `seed..` after it), then loads it,
/// `head_start` after Route (prefetching) or cold; the load's time.
async fn round(
    c: &mut kvtier_client::Client,
    rr: &mut RouterServiceClient<tonic::transport::Channel>,
    d: &Daemon,
    ns: &kvtier_client::Namespace,
    hashes: &[bytes::Bytes],
    seed: u64,
    head_start: Option<Duration>,
) -> Duration {
    for s in seed..seed + 4 {
        let more = testdata::chained_hashes(s, 32);
        let data: Vec<Vec<u8>> = more.iter().map(|h| testdata::block(h, BLOCK as usize)).collect();
        c.save(ns, &more, &data.iter().map(|b| &b[..]).collect::<Vec<_>>()).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while tiers(d, &ns.id, hashes).await != vec![pb::Tier::Disk as i32; BLOCKS] {
        assert!(Instant::now() < deadline, "the prompt never went to disk only");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The router's index catches up with the moves, as it would between requests.
    tokio::time::sleep(Duration::from_millis(200)).await;
    if let Some(wait) = head_start {
        let req = pb::RouteRequest { namespace_id: ns.id.clone(), hashes: hashes.to_vec() };
        let res = rr.route(req).await.unwrap().into_inner();
        assert_eq!(res.matched_blocks as usize, BLOCKS, "{res:?}");
        tokio::time::sleep(wait).await;
    }
    load(c, ns, hashes).await
}

/// Loads the prompt as an engine does (each block copied out of the pool); its time.
async fn load(c: &mut kvtier_client::Client, ns: &kvtier_client::Namespace, hashes: &[bytes::Bytes]) -> Duration {
    let mut engine = vec![0u8; BLOCKS * BLOCK as usize];
    engine.fill(1); // touched: the copy is not paying page faults
    let started = Instant::now();
    let mut loaded = 0;
    c.load(ns, hashes, |i, b| {
        engine[i * BLOCK as usize..][..b.len()].copy_from_slice(b);
        loaded += 1;
    })
    .await
    .unwrap();
    let took = started.elapsed();
    assert_eq!(loaded, BLOCKS);
    took
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let spill = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap(); // O_DIRECT: not tmpfs
    let flags = [
        "--pool-bytes",
        "96 MiB",
        "--slab-bytes",
        "4 MiB",
        "--disk-dir",
        spill.path().to_str().unwrap(),
        "--disk-bytes-per-dir",
        "512 MiB",
        "--disk-admission",
        "always",
    ];
    let d = Daemon::start(&flags);
    let router = RouterProc::start(&[d.grpc.as_str()], &[]);
    let mut c = d.client("bench-prefetch").await;
    let ns = c.register(namespace("bench-prefetch", BLOCK)).await.unwrap();
    let hashes = testdata::chained_hashes(1, BLOCKS);
    let blocks: Vec<Vec<u8>> = hashes.iter().map(|h| testdata::block(h, BLOCK as usize)).collect();
    c.save(&ns, &hashes, &blocks.iter().map(|b| &b[..]).collect::<Vec<_>>()).await.unwrap();
    let mut rr = RouterServiceClient::new(channel(&router.addr).await.unwrap());
    let mut seed = 100u64;
    let mut round = async |head_start: Option<Duration>| {
        seed += 10;
        round(&mut c, &mut rr, &d, &ns, &hashes, seed, head_start).await
    };

    let mut cold = Vec::new();
    for _ in 0..ROUNDS {
        cold.push(round(None).await);
    }
    let mut ahead: Vec<(u64, Vec<Duration>)> = Vec::new();
    for ms in [5u64, 20, 100] {
        let mut v = Vec::new();
        for _ in 0..ROUNDS {
            v.push(round(Some(Duration::from_millis(ms))).await);
        }
        ahead.push((ms, v));
    }
    // The reference: the same load with every block in the host tier.
    let mut host = Vec::new();
    for _ in 0..ROUNDS {
        host.push(load(&mut c, &ns, &hashes).await);
    }
    let (cold, host) = (median(cold), median(host));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "router prefetch: load of a {} MiB prompt ({BLOCKS} x {} MiB blocks) held only on disk; median of {ROUNDS}",
        (BLOCKS as u64 * BLOCK) >> 20,
        BLOCK >> 20
    );
    println!("  cold (the load waits for the disk): {:8.2} ms", ms(cold));
    println!("  from the host tier (reference):    {:8.2} ms", ms(host));
    println!("{:>22} {:>11} {:>12} {:>12}", "head start after Route", "load", "vs cold", "vs host");
    for (head, v) in ahead {
        let t = median(v);
        println!("{:>19} ms {:>8.2} ms {:>11.2}x {:>11.2}x", head, ms(t), ms(cold) / ms(t), ms(t) / ms(host));
    }
    let metrics = kvtier_tests::http_get(&router.metrics, "/metrics").unwrap_or_default();
    let sent = metrics.lines().find(|l| l.starts_with("kvtier_router_prefetches_total{outcome=\"sent\"}"));
    println!("  {}", sent.unwrap_or("no prefetch counter"));
}
