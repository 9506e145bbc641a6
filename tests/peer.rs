//! The peer tier with real daemons and real UCX on loopback: a daemon pulls thousands of blocks
//! from another's pool (tagged messages from the source's slots into the puller's reserved ones),
//! byte-exact, over TCP and over shared memory, striped over however many lanes each side runs;
//! a sender killed mid-transfer leaves nothing partial behind; a puller killed mid-transfer
//! leaves the sender serving; lanes with nothing to do sleep instead of polling, and wake when
//! a stopped source resumes.

use bytes::Bytes;
use kvtier_client::testdata;
use kvtier_proto::v1 as pb;
use kvtier_proto::v1::transfer_service_client::TransferServiceClient;
use kvtier_router::feed::channel;
use kvtier_tests::{eventually_within, namespace, Daemon};
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The tests that measure a daemon's CPU time run alone (write), the others together (read):
/// the transfers of the others, on a 2-core machine, made an idle lane's naps cost it CPU.
static QUIET: RwLock<()> = RwLock::const_new(());

async fn shared() -> RwLockReadGuard<'static, ()> {
    QUIET.read().await
}

async fn alone() -> RwLockWriteGuard<'static, ()> {
    QUIET.write().await
}

fn daemon(pool: &str, tls: &[&str]) -> Daemon {
    let mut args = vec!["--pool-bytes", pool, "--slab-bytes", "4 MiB", "--transfer", "--ucx-transports"];
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

/// Blocks of the kill tests: 2,400 of them make a 600 MiB prompt.
const KILL_BLOCK: u64 = 256 * 1024;

type PullTask = tokio::task::JoinHandle<Result<pb::PullResponse, tonic::Status>>;

/// Has `into` pull a small prompt from `from`, which connects every lane between them (as P/D
/// pairs that talked before are), so that the kill tests' victim dies while blocks flow, not
/// while connections are being set up.
async fn connect_lanes(into: &Daemon, from: &Daemon) {
    let (ns, hashes) = save(from, 9, 16, KILL_BLOCK).await;
    assert_eq!(pull(into, from, &ns, &hashes).await.unwrap().pulled, 16);
}

/// Saves a 600 MiB prompt on `from`, starts pulling it into `into` (on a task), waits until
/// `from` is sending and freezes `victim` (SIGSTOP) mid-transfer; tries again with another prompt
/// when the pull ended first. Returns the pull, the namespace and the hashes.
async fn pull_frozen_mid_way(into: &Daemon, from: &Daemon, victim: &Daemon) -> (PullTask, Bytes, Vec<Bytes>) {
    let victim = nix::unistd::Pid::from_raw(victim.pid() as i32);
    for attempt in 0..5 {
        let (ns, hashes) = save(from, 10 + attempt, 2400, KILL_BLOCK).await;
        let (into_grpc, from_grpc, ns2, hs2) = (into.grpc.clone(), from.grpc.clone(), ns.clone(), hashes.clone());
        let puller = tokio::spawn(async move {
            let mut c = TransferServiceClient::new(channel(&into_grpc).await.unwrap());
            c.pull(pb::PullRequest { source: from_grpc, namespace_id: ns2, hashes: hs2 }).await.map(|r| r.into_inner())
        });
        while from.metric("kvtier_peer_shipments_in_flight") < 1.0 && !puller.is_finished() {}
        nix::sys::signal::kill(victim, nix::sys::signal::SIGSTOP).expect("SIGSTOP");
        if !puller.is_finished() {
            return (puller, ns, hashes);
        }
        let _ = nix::sys::signal::kill(victim, nix::sys::signal::SIGCONT);
    }
    panic!("a 600 MiB pull never stayed in flight long enough to freeze");
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
    ships_byte_exact_between(&a, &b, 1).await;
}

/// Pulls prompt `seed` of 3,000 blocks from `a` into `b`, checks every byte, pulls again.
async fn ships_byte_exact_between(a: &Daemon, b: &Daemon, seed: u64) {
    let block = 16 * 1024;
    let (ns, hashes) = save(a, seed, 3000, block).await;
    // The receiver knows the namespace (its engine registered it) but holds nothing.
    save(b, seed + 1000, 1, block).await;
    let r = pull(b, a, &ns, &hashes).await.unwrap();
    assert_eq!((r.pulled, r.present), (3000, 0));
    assert_eq!(verify(b, &hashes, block).await, 3000);
    assert_eq!(b.metric("kvtier_peer_pulled_blocks_total"), 3000.0);
    // Pulling again finds everything present; the offer pins were released.
    let again = pull(b, a, &ns, &hashes).await.unwrap();
    assert_eq!((again.pulled, again.present), (0, 3000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_blocks_ship_byte_exact_over_tcp() {
    let _quiet = shared().await;
    ships_byte_exact(&["tcp", "--transfer-net-devices", "lo"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_blocks_ship_byte_exact_over_shared_memory_verifying_every_byte() {
    let _quiet = shared().await;
    ships_byte_exact(&["shm", "--transfer-verify", "full"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_with_different_lane_counts_ship_byte_exact_both_ways() {
    let _quiet = shared().await;
    // A pull is striped over the puller's lanes; the source spreads them over its own.
    let one = daemon(
        "96 MiB",
        &["tcp", "--transfer-net-devices", "lo", "--transfer-lanes", "1", "--transfer-verify", "full"],
    );
    let three = daemon(
        "96 MiB",
        &["tcp", "--transfer-net-devices", "lo", "--transfer-lanes", "3", "--transfer-verify", "full"],
    );
    ships_byte_exact_between(&one, &three, 1).await;
    ships_byte_exact_between(&three, &one, 2).await;
}

/// CPU seconds `pid` has used (user and system), from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses: utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) } as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_daemons_sleep_after_shipping() {
    let _quiet = alone().await;
    // Lanes once polled for commands every 100 us when idle: a quarter of a core per daemon.
    for tls in [&["tcp", "--transfer-net-devices", "lo"][..], &["shm"]] {
        let (a, b) = (daemon("64 MiB", tls), daemon("64 MiB", tls));
        let (ns, hashes) = save(&a, 5, 64, 64 << 10).await;
        save(&b, 6, 1, 64 << 10).await;
        assert_eq!(pull(&b, &a, &ns, &hashes).await.unwrap().pulled, 64);
        let before = [cpu_seconds(a.pid()), cpu_seconds(b.pid())];
        std::thread::sleep(std::time::Duration::from_secs(3));
        for (d, was) in [&a, &b].iter().zip(before) {
            let used = cpu_seconds(d.pid()) - was;
            assert!(used < 0.3, "{tls:?}: an idle daemon used {used:.2} CPU seconds in 3 s (lanes polling?)");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_puller_waiting_on_a_stopped_source_sleeps_then_finishes_when_it_resumes() {
    let _quiet = alone().await;
    // Receiving lanes once spun and napped for as long as nothing came: 0.4 of a core here.
    for tls in [&["tcp", "--transfer-net-devices", "lo"][..], &["shm"]] {
        let (a, b) = (daemon("768 MiB", tls), daemon("768 MiB", tls));
        save(&b, 2, 1, KILL_BLOCK).await;
        connect_lanes(&b, &a).await;
        let (puller, _, hashes) = pull_frozen_mid_way(&b, &a, &a).await;
        let was = cpu_seconds(b.pid());
        std::thread::sleep(std::time::Duration::from_secs(2));
        let used = cpu_seconds(b.pid()) - was;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(a.pid() as i32), nix::sys::signal::SIGCONT).unwrap();
        assert!(used < 0.3, "{tls:?}: the puller used {used:.2} CPU seconds in 2 s waiting on a stopped source");
        let pulled = puller.await.unwrap().expect("the pull finishes once its source runs again");
        assert_eq!(pulled.pulled, 2400, "{tls:?}");
        assert_eq!(verify(&b, &hashes, KILL_BLOCK).await, 2400, "{tls:?}");
    }
}

/// Kills the sender of a 600 MiB pull (frozen once it is sending) and checks the puller kept
/// nothing and freed every slot.
async fn sender_killed_mid_transfer(tls: &[&str]) {
    let (mut a, mut b) = (daemon("768 MiB", tls), daemon("768 MiB", tls));
    save(&b, 2, 1, KILL_BLOCK).await;
    connect_lanes(&b, &a).await;
    let used_before = b.metric("kvtier_host_used_bytes");
    let (puller, _, hashes) = pull_frozen_mid_way(&b, &a, &a).await;
    a.kill();
    let result = puller.await.unwrap();
    let err = result.expect_err("the pull cannot succeed with its sender gone mid-way");
    if err.code() != tonic::Code::Aborted {
        std::thread::sleep(std::time::Duration::from_millis(500));
        panic!("{err:?}; the puller ended {:?}; its log:\n{}", b.exit_status(), b.log());
    }
    assert!(err.message().contains("nothing kept"), "{err:?}");
    assert_eq!(verify(&b, &hashes, KILL_BLOCK).await, 0, "nothing partial is visible");
    eventually_within("its slots were freed", 20, || b.metric("kvtier_host_used_bytes") == used_before);
    assert_eq!(b.metric("kvtier_peer_pull_failures_total"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_killed_mid_transfer_leaves_nothing_partial() {
    let _quiet = shared().await;
    sender_killed_mid_transfer(&["tcp", "--transfer-net-devices", "lo"]).await;
}

// No shared-memory variant: UCX 1.13 has no peer-failure handling over shared memory (its
// sysv/posix/cma transports refuse UCP_ERR_HANDLING_MODE_PEER), and a sender killed while data
// flows aborts the receiver inside UCX; docs/transfer.md says so and the daemon warns.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_puller_killed_mid_transfer_leaves_the_sender_serving() {
    let _quiet = shared().await;
    let tls = ["tcp", "--transfer-net-devices", "lo"];
    let (a, mut b) = (daemon("768 MiB", &tls), daemon("768 MiB", &tls));
    save(&b, 2, 1, KILL_BLOCK).await;
    connect_lanes(&b, &a).await;
    let (puller, ns, hashes) = pull_frozen_mid_way(&b, &a, &b).await;
    b.kill();
    assert!(puller.await.unwrap().is_err());
    eventually_within("the sender saw its shipment fail", 60, || a.metric("kvtier_peer_ship_failures_total") == 1.0);
    // The sender still serves: another daemon pulls the whole prompt from it.
    let shipped = a.metric("kvtier_peer_shipped_blocks_total");
    let c = daemon("768 MiB", &tls);
    save(&c, 3, 1, KILL_BLOCK).await;
    let r = pull(&c, &a, &ns, &hashes).await.unwrap();
    assert_eq!((r.pulled, r.present), (2400, 0));
    assert_eq!(verify(&c, &hashes, KILL_BLOCK).await, 2400);
    assert_eq!(a.metric("kvtier_peer_shipped_blocks_total"), shipped + 2400.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_of_many_prompts_stay_apart() {
    let _quiet = shared().await;
    let tls = ["tcp", "--transfer-net-devices", "lo"];
    let (a, b) = (daemon("256 MiB", &tls), daemon("256 MiB", &tls));
    let block = 64 * 1024;
    save(&b, 2, 1, block).await;
    // 16 prompts of 100 blocks on the source, pulled all at once: tags, slots and fingerprints
    // of one pull never mix with another's.
    let mut prompts = Vec::new();
    for p in 0..16u64 {
        prompts.push(save(&a, 100 + p, 100, block).await);
    }
    let pulls: Vec<_> = prompts
        .iter()
        .map(|(ns, hashes)| {
            let (into, from, ns, hashes) = (b.grpc.clone(), a.grpc.clone(), ns.clone(), hashes.clone());
            tokio::spawn(async move {
                let mut c = TransferServiceClient::new(channel(&into).await.unwrap());
                c.pull(pb::PullRequest { source: from, namespace_id: ns, hashes }).await.map(|r| r.into_inner())
            })
        })
        .collect();
    for pull in pulls {
        let r = pull.await.unwrap().unwrap();
        assert_eq!((r.pulled, r.present), (100, 0));
    }
    for (_, hashes) in &prompts {
        assert_eq!(verify(&b, hashes, block).await, 100);
    }
    assert_eq!(b.metric("kvtier_peer_pulled_blocks_total"), 1600.0);
    assert_eq!(a.metric("kvtier_peer_shipped_blocks_total"), 1600.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_shipments_are_refused_and_the_sender_carries_on() {
    let _quiet = shared().await;
    let tls = ["tcp", "--transfer-net-devices", "lo"];
    let (mut a, b) = (daemon("64 MiB", &tls), daemon("64 MiB", &tls));
    let block = 16 * 1024;
    let (ns, hashes) = save(&a, 1, 10, block).await;
    let mut t = TransferServiceClient::new(channel(&a.grpc).await.unwrap());
    let offer = t.offer(pb::OfferRequest { namespace_id: ns.clone(), hashes: hashes.clone() }).await.unwrap();
    let offer = offer.into_inner().offer;
    let ship = |offer, workers: Vec<Vec<u8>>, blocks: Vec<u32>, verify| pb::ShipRequest {
        offer,
        worker_addresses: workers.into_iter().map(Bytes::from).collect(),
        lane_ports: vec![],
        tag_base: 1 << 32,
        blocks,
        verify,
        seed: 7,
    };
    let to_ports = |ports: Vec<u32>, workers: Vec<Vec<u8>>| pb::ShipRequest {
        lane_ports: ports,
        ..ship(offer, workers, vec![0], 0)
    };
    let worker = || vec![1u8; 40];
    let refused = [
        (ship(offer + 99, vec![worker()], vec![0], 0), "no such offer"),
        (ship(offer, vec![worker()], vec![10], 0), "offer has no block 10"),
        (ship(offer, vec![worker()], vec![0], 9), "unknown verify mode"),
        (ship(offer, vec![vec![]], vec![0], 0), "worker address 0"),
        (ship(offer, vec![worker(), vec![0x20; 10]], vec![0, 1], 0), "worker address 1"),
        (ship(offer, vec![], vec![0], 0), "0 lanes"),
        (ship(offer, vec![worker(); 17], vec![0], 0), "17 lanes"),
        (to_ports(vec![0], vec![]), "not a port"),
        (to_ports(vec![70000], vec![]), "not a port"),
        (to_ports(vec![7000; 17], vec![]), "17 lanes"),
        (to_ports(vec![7000], vec![worker()]), "not both"),
    ];
    for (req, why) in refused {
        let err = t.ship(req).await.expect_err("refused");
        assert!(err.message().contains(why), "{why}: {err:?}");
    }
    // A lane port nobody listens on: the connection fails, and so does the shipment.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let err = t.ship(to_ports(vec![u32::from(closed)], vec![])).await.expect_err("nobody listens");
    assert!(err.message().contains("connect"), "{err:?}");
    assert!(a.is_running(), "the sender survived every bad shipment");
    save(&b, 2, 1, block).await;
    let r = pull(&b, &a, &ns, &hashes).await.unwrap();
    assert_eq!((r.pulled, r.present), (10, 0));
}
