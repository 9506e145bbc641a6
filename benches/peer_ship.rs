//! Peer tier: pulling blocks from another daemon's pool (UCX tagged messages from the source's
//! pinned slots straight into the puller's reserved ones, fingerprints checked) against
//! `ucx_perftest -t tag_bw` with the same transport and message size, same run, ratio printed.
//! Goal: >= 0.8x ucx_perftest.
//!
//! A second reference shows what UCX itself does over memory like a pool's: the same tagged
//! messages between workers of one process, every message from and into its own buffer (256
//! MiB each side, huge pages when the daemons get them), where `ucx_perftest` reuses one
//! message-sized buffer that stays in cache; over one pair of workers and over as many pairs as
//! kvtier runs lanes (messages striped over them as a pull is). kvtier is measured with one lane
//! and with the default.
//!
//! Then the same pull with `--transfer-verify full` (every byte hashed on both sides), and the first
//! of kvtier x2's rounds alone: the pull that also connects the daemons' lanes.
//! A last table pulls 16 prompts at once (P/D-shaped) against UCX distinct.
//!
//! `cargo build --release --bins && cargo bench -p kvtier-benches --bench peer_ship`
//! (`PEER_SHIP_ONLY=tcp` or `=shm` runs one transport's rows; `PEER_SHIP_PAGES=4k` puts pools
//! and buffers on 4 KiB pages, the daemon's default, instead of reserving huge pages.)

use kvtier_client::testdata;
use kvtier_proto::v1 as pb;
use kvtier_proto::v1::transfer_service_client::TransferServiceClient;
use kvtier_router::feed::channel;
use kvtier_tests::{namespace, Daemon};
use kvtier_ucx::{Context, Woken, Worker};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::Instant;

const BYTES: u64 = 256 << 20;
const ROUNDS: u64 = 3;
/// Prompts pulled at once in the P/D-shaped run.
const CONCURRENT: usize = 16;
/// The daemon's default `peer.lanes`.
const LANES: usize = 2;
/// 2 MiB huge pages both daemons' 1 GiB pools and the reference's buffers need.
const HUGE_PAGES: u64 = 1200;

/// (name, UCX settings without the `UCX_` prefix, kvtierd flags) of one transport.
type Transport = (&'static str, &'static [(&'static str, &'static str)], &'static [&'static str]);

/// ucx_perftest tag_bw bandwidth in bytes/s (server and client processes on this host, BYTES
/// per run): best of ROUNDS runs, as every other column.
fn perftest(settings: &[(&str, &str)], size: u64, port: u16) -> f64 {
    (0..ROUNDS).map(|_| perftest_once(settings, size, port)).fold(0f64, f64::max)
}

fn perftest_once(settings: &[(&str, &str)], size: u64, port: u16) -> f64 {
    let iters = (BYTES / size).to_string();
    let env: Vec<(String, &str)> = settings.iter().map(|(k, v)| (format!("UCX_{k}"), *v)).collect();
    let mut server = Command::new("ucx_perftest")
        .args(["-p", &port.to_string()])
        .envs(env.iter().map(|(k, v)| (k.as_str(), *v)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ucx_perftest (apt install ucx-utils; scripts/test installs it)");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let out = Command::new("ucx_perftest")
        .args(["127.0.0.1", "-p", &port.to_string(), "-t", "tag_bw", "-s", &size.to_string()])
        .args(["-n", &iters, "-w", "16", "-f"])
        .envs(env.iter().map(|(k, v)| (k.as_str(), *v)))
        .output()
        .expect("ucx_perftest client");
    let _ = server.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().rev().find(|l| l.split_whitespace().count() >= 8).expect("a result line");
    let mb_per_s: f64 = last.split_whitespace().nth(5).and_then(|v| v.parse().ok()).expect("bandwidth column");
    mb_per_s * (1 << 20) as f64
}

/// BYTES of anonymous memory, on huge pages if asked, touched.
fn buffer(huge: bool) -> memmap2::MmapMut {
    let mut opts = memmap2::MmapOptions::new();
    opts.len(BYTES as usize);
    if huge {
        opts.huge(Some(21));
    }
    let mut m = opts.map_anon().expect("anonymous map (huge pages reserved?)");
    m.fill(1);
    m
}

/// How a reference sender reaches its receiver: as the daemon's lanes are reached.
enum Reach {
    /// A listener's port on loopback (TCP: client-server endpoints).
    Port(u16),
    /// A worker address (shared memory, which has no connection manager in UCX 1.13).
    Address(Vec<u8>),
}

/// Tag of the one-byte message each reference pair exchanges before the clock starts.
const HELLO: u64 = u64::MAX;

/// UCX tagged-message bandwidth in bytes/s over `lanes` pairs of workers (threads) of this
/// process, message `i` from and into offset `i * size` of its side's buffer, striped over the
/// pairs as kvtier stripes a pull over its lanes, connected as the daemon's lanes are: best of
/// ROUNDS.
fn ucx_distinct(settings: &[(&str, &str)], size: u64, huge: bool, lanes: usize) -> f64 {
    let (count, size) = ((BYTES / size) as usize, size as usize);
    let (mut target, data) = (buffer(huge), buffer(huge));
    let (into, from) = (target.as_mut_ptr() as usize, data.as_ptr() as usize);
    let detect = !settings.iter().any(|(_, v)| v.contains("shm"));
    let mut best = 0f64;
    for _ in 0..ROUNDS {
        let start = Arc::new(Barrier::new(2 * lanes + 1));
        let mut threads = Vec::new();
        for lane in 0..lanes {
            let (rc, sc) = (Context::new(settings).unwrap(), Context::new(settings).unwrap());
            let (reach_tx, reach_rx) = std::sync::mpsc::channel();
            let go = Arc::clone(&start);
            threads.push(std::thread::spawn(move || {
                let receiver = Worker::new(&rc).unwrap();
                let listener = detect.then(|| receiver.listen("127.0.0.1:0".parse().unwrap()).unwrap());
                reach_tx
                    .send(match &listener {
                        Some(l) => Reach::Port(l.local_addr().unwrap().port()),
                        None => Reach::Address(receiver.address().unwrap()),
                    })
                    .unwrap();
                let mut hello = [0u8; 1];
                // SAFETY: `hello` outlives the receive (completed in the loop below).
                unsafe { receiver.tag_recv(hello.as_mut_ptr(), 1, None, HELLO, HELLO) }.unwrap();
                let mut accepted = Vec::new();
                while receiver.take_completions().is_empty() {
                    receiver.progress();
                    for request in listener.iter().flat_map(|l| l.take_requests()) {
                        accepted.push(receiver.accept(request, true).unwrap());
                    }
                }
                let mine: Vec<usize> = (lane..count).step_by(lanes).collect();
                for &i in &mine {
                    // SAFETY: `target` outlives the receive (drained below, joined before it drops).
                    unsafe { receiver.tag_recv((into + i * size) as *mut u8, size, None, i as u64, i as u64) }.unwrap();
                }
                go.wait();
                drain(&receiver, mine.len(), false);
                drop(accepted);
            }));
            let go = Arc::clone(&start);
            threads.push(std::thread::spawn(move || {
                let sender = Worker::new(&sc).unwrap();
                let ep = match reach_rx.recv().unwrap() {
                    Reach::Port(port) => sender.connect_to(([127, 0, 0, 1], port).into(), true),
                    Reach::Address(address) => sender.connect(&address, false),
                }
                .unwrap();
                let hello = [1u8];
                // SAFETY: `hello` outlives the send (drained right after).
                unsafe { sender.tag_send(&ep, hello.as_ptr(), 1, None, HELLO, HELLO) }.unwrap();
                drain(&sender, 1, true);
                go.wait();
                let mine: Vec<usize> = (lane..count).step_by(lanes).collect();
                for &i in &mine {
                    // SAFETY: `data` outlives the send (drained below, joined before it drops).
                    unsafe { sender.tag_send(&ep, (from + i * size) as *const u8, size, None, i as u64, i as u64) }
                        .unwrap();
                }
                drain(&sender, mine.len(), true);
                drop(ep);
            }));
        }
        start.wait();
        let started = Instant::now();
        for t in threads {
            t.join().unwrap();
        }
        best = best.max(BYTES as f64 / started.elapsed().as_secs_f64());
    }
    best
}

/// Progresses `worker` until `n` of its operations completed, idling as the daemon's lanes do
/// (an idle thread leaves the cores to the ones copying): a receiver naps 20 us after 256 empty
/// rounds, a sender sleeps until UCX wakes it after 16 (at most 1 ms).
fn drain(worker: &Worker, n: usize, sending: bool) {
    let (mut done, mut idle) = (0, 0u32);
    while done < n {
        idle = if worker.progress() == 0 { idle + 1 } else { 0 };
        if sending && idle > 16 {
            if worker.wait(None, std::time::Duration::from_millis(1)).unwrap() != Woken::Busy {
                idle = 0;
            }
        } else if idle > 256 {
            std::thread::sleep(std::time::Duration::from_micros(20));
        }
        done += worker.take_completions().len();
    }
}

/// kvtier pull bandwidth in bytes/s between two daemons: BYTES split into `prompts` prompts
/// pulled at once (one Pull each); (best of ROUNDS, the first round's: the one that connects the
/// daemons' lanes). Every round's prompts are saved on the source first, so that no pull shares
/// the machine with the benchmark making and saving data.
async fn kvtier(flags: &[&str], size: u64, huge: bool, prompts: usize) -> (f64, f64) {
    let mut args = vec!["--pool-bytes", "1 GiB", "--slab-bytes", "8 MiB", "--transfer"];
    args.extend(flags);
    if huge {
        args.push("--hugetlb");
    }
    let (a, b) = (Daemon::start(&args), Daemon::start(&args));
    let n = (BYTES / size) as usize / prompts;
    let mut ca = a.client("bench-ship").await;
    let ns = ca.register(namespace("bench-ship", size)).await.unwrap();
    let mut cb = b.client("bench-ship").await;
    cb.register(namespace("bench-ship", size)).await.unwrap();
    let mut rounds = Vec::new();
    for round in 0..ROUNDS {
        let mut requests = Vec::new();
        for p in 0..prompts as u64 {
            let hashes = testdata::chained_hashes((size * 10 + round) * 1000 + p, n);
            let blocks: Vec<Vec<u8>> = hashes.iter().map(|h| testdata::block(h, size as usize)).collect();
            ca.save(&ns, &hashes, &blocks.iter().map(|b| &b[..]).collect::<Vec<_>>()).await.unwrap();
            requests.push(pb::PullRequest { source: a.grpc.clone(), namespace_id: ns.id.clone(), hashes });
        }
        rounds.push(requests);
    }
    let channel = channel(&b.grpc).await.unwrap();
    let mut each = Vec::new();
    for requests in rounds {
        let started = Instant::now();
        let pulls: Vec<_> = requests
            .into_iter()
            .map(|req| {
                let mut t = TransferServiceClient::new(channel.clone());
                tokio::spawn(async move { t.pull(req).await.unwrap().into_inner() })
            })
            .collect();
        for pull in pulls {
            assert_eq!(pull.await.unwrap().pulled as usize, n);
        }
        each.push((n * prompts) as f64 * size as f64 / started.elapsed().as_secs_f64());
    }
    (each.iter().copied().fold(0f64, f64::max), each[0])
}

/// Reserves the huge pages the run wants (we are root in CI); false if the kernel would not.
fn reserve_huge_pages() -> bool {
    let path = "/proc/sys/vm/nr_hugepages";
    let have: u64 = std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    if have < HUGE_PAGES {
        let _ = std::fs::write(path, HUGE_PAGES.to_string());
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let free = meminfo.lines().find_map(|l| l.strip_prefix("HugePages_Free:")).and_then(|v| v.trim().parse().ok());
    free.unwrap_or(0u64) >= HUGE_PAGES
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // The daemon's default is 4 KiB pages; PEER_SHIP_PAGES=4k measures that.
    let huge = std::env::var("PEER_SHIP_PAGES").map_or(true, |p| p != "4k") && reserve_huge_pages();
    println!(
        "peer tier: Pull of {} MiB between two kvtierd (offer, tagged messages slot to slot, sampled fingerprints, \
         commit), pools on {} pages; best of {ROUNDS}",
        BYTES >> 20,
        if huge { "2 MiB huge" } else { "4 KiB" }
    );
    println!(
        "  references: ucx_perftest tag_bw (one reused buffer); UCX tag over 256 MiB of distinct buffers each side, \
         over 1 and {LANES} worker pairs (kvtier's lanes); kvtier with --transfer-lanes 1 and {LANES} (the default)"
    );
    println!(
        "{:>9} {:>6} {:>13} {:>13} {:>13} {:>13} {:>13} {:>11} {:>11} {:>13} {:>13}",
        "transport",
        "block",
        "ucx_perftest",
        "UCX dist. x1",
        format!("UCX dist. x{LANES}"),
        "kvtier x1",
        format!("kvtier x{LANES}"),
        "vs perftest",
        "vs UCX dist",
        "verify full",
        "1st pull"
    );
    let transports: [Transport; 2] = [
        ("tcp", &[("TLS", "tcp"), ("NET_DEVICES", "lo")], &["--ucx-transports", "tcp", "--transfer-net-devices", "lo"]),
        ("shm", &[("TLS", "shm")], &["--ucx-transports", "shm"]),
    ];
    let mut port = 13500;
    let one_lane = ["--transfer-lanes", "1"];
    let only = std::env::var("PEER_SHIP_ONLY").unwrap_or_default();
    let transports: Vec<Transport> = transports.into_iter().filter(|t| only.is_empty() || t.0 == only).collect();
    for &(name, settings, flags) in &transports {
        for size in [1u64 << 20, 4 << 20] {
            port += 1;
            let reference = perftest(settings, size, port);
            let (distinct1, distinct) =
                (ucx_distinct(settings, size, huge, 1), ucx_distinct(settings, size, huge, LANES));
            let (ours1, _) = kvtier(&[flags, &one_lane[..]].concat(), size, huge, 1).await;
            let (ours, first) = kvtier(flags, size, huge, 1).await;
            let (full, _) = kvtier(&[flags, &["--transfer-verify", "full"][..]].concat(), size, huge, 1).await;
            let g = |bps: f64| format!("{:.2} GB/s", bps / 1e9);
            println!(
                "{name:>9} {:>6} {:>13} {:>13} {:>13} {:>13} {:>13} {:>10.2}x {:>10.2}x {:>13} {:>13}",
                format!("{} MiB", size >> 20),
                g(reference),
                g(distinct1),
                g(distinct),
                g(ours1),
                g(ours),
                ours / reference,
                ours / distinct,
                g(full),
                g(first)
            );
        }
    }
    println!(
        "  P/D-shaped: {CONCURRENT} prompts of {} MiB (1 MiB blocks) pulled at once",
        (BYTES >> 20) / CONCURRENT as u64
    );
    println!("{:>10} {:>14} {:>16} {:>14}", "transport", "UCX distinct", "kvtier, at once", "vs distinct");
    for &(name, settings, flags) in &transports {
        let distinct = ucx_distinct(settings, 1 << 20, huge, LANES);
        let (ours, _) = kvtier(flags, 1 << 20, huge, CONCURRENT).await;
        println!("{name:>10} {:>9.2} GB/s {:>11.2} GB/s {:>13.2}x", distinct / 1e9, ours / 1e9, ours / distinct);
    }
}
