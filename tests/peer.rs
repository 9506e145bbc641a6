//! The peer tier with real daemons and real UCX on loopback: a daemon pulls thousands of blocks
//! from another's pool by RMA, byte-exact, over TCP and over shared memory; a sender killed
//! mid-transfer leaves nothing partial behind.

use bytes::Bytes;
use kvtier_client::router::feed::channel;
use kvtier_client::testdata;
use kvtier_proto::v1 as pb;
use kvtier_proto::v1::transfer_service_client::TransferServiceClient;
use kvtier_tests::{eventually_within, namespace, Daemon};

fn daemon(pool: &str, tls: &[&str]) -> Daemon {
    let mut args = vec!["--pool-bytes", pool, "--slab-bytes", "4 MiB", "--peer", "--peer-tls"];
    args.extend(tls);
    Daemon::start_with_metrics(&args, true)
}

/// Saves prompt `seed` of `n` blocks of `block` bytes on `d`; returns the namespace id and hashes.
async fn save(d: &Daemon, seed: u64, n: usize, block: u64) -> (Bytes, Vec<Bytes>) {
    let mut c = d.client("peer-test").await;
    let ns = c.register(namespace("peer-test", block)).await.unwrap();
    let hashes = testdata::chained_hashes(seed, n);
    for (hs, _) in hashes.chunks(512).zip(0..) {
        let blocks: Vec<Vec<u8>> = hs.iter().map(|h| testdata::block(h, block as usize)).collect();
        c.save(&ns, hs, &blocks.iter().map(|b| &b[..]).collect::<Vec<_>>()).await.unwrap();
    }
    (ns.id.clone(), hashes)
}

async fn pull(into: &Daemon, from: &Daemon, ns: &Bytes, hashes: &[Bytes]) -> Result<pb::PullResponse, tonic::Status> {
    let mut c = TransferServiceClient::new(channel(&into.grpc).await.unwrap());
    let req = pb::PullRequest { source: from.grpc.clone(), namespace_id: ns.clone(), hashes: hashes.to_vec() };
    c.pull(req).await.map(|r| r.into_inner())
}

/// Loads the prompt from `d` and checks every byte; returns the blocks loaded.
async fn verify(d: &Daemon, hashes: &[Bytes], block: u64) -> usize {
    let mut c = d.client("peer-verify").await;
    let ns = c.register(namespace("peer-test", block)).await.unwrap();
    let mut bad = 0;
    let n = c
        .load(&ns, hashes, |i, got| bad += usize::from(got != &testdata::block(&hashes[i], block as usize)[..]))
        .await
        .unwrap();
    assert_eq!(bad, 0, "every shipped byte equals what was saved");
    n
}

async fn ships_byte_exact(tls: &[&str]) {
    let (a, b) = (daemon("96 MiB", tls), daemon("96 MiB", tls));
    let block = 16 * 1024;
    let (ns, hashes) = save(&a, 1, 3000, block).await;
    // The receiver knows the namespace (its engine registered it) but holds nothing.
    save(&b, 2, 1, block).await;
    let r = pull(&b, &a, &ns, &hashes).await.unwrap();
    assert_eq!((r.pulled, r.present), (3000, 0));
    assert_eq!(verify(&b, &hashes, block).await, 3000);
    assert_eq!(b.metric("kvtier_peer_pulled_blocks_total"), 3000.0);
    // Pulling again finds everything present; the offer pins were released.
    let again = pull(&b, &a, &ns, &hashes).await.unwrap();
    assert_eq!((again.pulled, again.present), (0, 3000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_blocks_ship_byte_exact_over_tcp() {
    ships_byte_exact(&["tcp", "--peer-net-devices", "lo"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_blocks_ship_byte_exact_over_shared_memory() {
    ships_byte_exact(&["shm"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_killed_mid_transfer_leaves_nothing_partial() {
    let tls = ["tcp", "--peer-net-devices", "lo"];
    let (mut a, b) = (daemon("768 MiB", &tls), daemon("768 MiB", &tls));
    let block = 256 * 1024;
    let (ns, hashes) = save(&a, 1, 2400, block).await; // 600 MiB
    save(&b, 2, 1, block).await;
    let used_before = b.metric("kvtier_host_used_bytes");
    let (b_grpc, a_grpc, ns2, hs2) = (b.grpc.clone(), a.grpc.clone(), ns.clone(), hashes.clone());
    let puller = tokio::spawn(async move {
        let mut c = TransferServiceClient::new(channel(&b_grpc).await.unwrap());
        c.pull(pb::PullRequest { source: a_grpc, namespace_id: ns2, hashes: hs2 }).await
    });
    eventually_within("the RMA reads started", 20, || b.metric("kvtier_peer_pulls_in_flight") >= 1.0);
    a.kill();
    let result = puller.await.unwrap();
    let err = result.expect_err("the pull cannot succeed with its sender gone mid-way");
    assert_eq!(err.code(), tonic::Code::Aborted, "{err:?}");
    assert!(err.message().contains("nothing kept"), "{err:?}");
    assert_eq!(verify(&b, &hashes, block).await, 0, "nothing partial is visible");
    assert_eq!(b.metric("kvtier_host_used_bytes"), used_before, "its slots were freed");
    assert_eq!(b.metric("kvtier_peer_pull_failures_total"), 1.0);
}
