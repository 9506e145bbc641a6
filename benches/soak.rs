//! Soak and chaos: many clients for a long time against two real daemons with the disk tier and
//! daemon-to-daemon transfer on, while the daemons are killed and restarted, engines are killed mid-save, the disk
//! fills up and then fails, and hostile clients send garbage. Asserts that no loaded byte is ever
//! wrong, that the daemons keep serving, and that once the clients are gone the daemons hold no
//! reservation, pin or connection, and their RSS and open files are back near where they started.
//! Prints what it held and survived (`docs/reliability.md`).
//!
//! `cargo build --release --bins && cargo bench -p kvtier-benches --bench soak -- --minutes 30 --clients 32`
//! (needs root: the disk is a loop-mounted ext4 image it fills and shuts down).

use bytes::Bytes;
use kvtier_client::{testdata, Client, NamespaceDescriptor};
use kvtier_proto::v1::{self as pb, request::Op, response};
use kvtier_tests::{bin, Daemon, LoopFs, TRANSFER_OVER_TCP};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BLOCK: u64 = 64 << 10;

#[derive(Default)]
struct Counters {
    saves: AtomicU64,
    saved_blocks: AtomicU64,
    loads: AtomicU64,
    loaded_blocks: AtomicU64,
    verified_bytes: AtomicU64,
    wrong_blocks: AtomicU64,
    pulls: AtomicU64,
    pulled_blocks: AtomicU64,
    client_errors: AtomicU64,
    reconnects: AtomicU64,
    bad_inputs: AtomicU64,
    engine_kills: AtomicU64,
    daemon_kills: AtomicU64,
    disk_fills: AtomicU64,
    disk_failures: AtomicU64,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(default)
}

fn descriptor(tenant: u64) -> NamespaceDescriptor {
    NamespaceDescriptor {
        model: "soak".into(),
        cache_salt: format!("tenant-{tenant}"),
        kv_dtype: "float32".into(),
        tokens_per_block: 16,
        block_bytes: BLOCK,
        ..Default::default()
    }
}

/// A prompt of tenant `tenant`: popular prompts come back often, long ones share prefixes.
fn prompt(rng: &mut Rng, tenant: u64) -> Vec<Bytes> {
    let p = rng.below(8) * rng.below(8);
    let len = 8 + (p * 7) % 56;
    testdata::chained_hashes(tenant * 1000 + p, len as usize)
}

/// Loads the held prefix of `hashes`, comparing every byte with what was saved under it.
async fn load_verified(
    c: &mut Client,
    ns: &kvtier_client::Namespace,
    hashes: &[Bytes],
    k: &Counters,
) -> kvtier_client::Result<()> {
    let mut wrong = 0;
    let mut bytes = 0;
    let n = c
        .load(ns, hashes, |i, b| {
            bytes += b.len() as u64;
            if b != testdata::block(&hashes[i], BLOCK as usize) {
                wrong += 1;
            }
        })
        .await?;
    k.loads.fetch_add(1, Relaxed);
    k.loaded_blocks.fetch_add(n as u64, Relaxed);
    k.verified_bytes.fetch_add(bytes, Relaxed);
    k.wrong_blocks.fetch_add(wrong, Relaxed);
    Ok(())
}

/// An engine: saves and loads its tenant's prompts on one daemon (`pull_from`: a decode engine
/// pulling from the other daemon first), reconnecting whenever the daemon goes away.
async fn engine(
    id: u64,
    socket: Arc<Mutex<std::path::PathBuf>>,
    pull_from: Option<String>,
    stop: Arc<AtomicBool>,
    k: Arc<Counters>,
) {
    let mut rng = Rng(0x9e37_79b9 ^ ((id + 1) * 0x1000_0001));
    let tenant = id % 4;
    while !stop.load(Relaxed) {
        let path = socket.lock().unwrap().clone();
        let Ok(mut c) = Client::connect(&path, &format!("soak-{id}")).await else {
            k.reconnects.fetch_add(1, Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let Ok(ns) = c.register(descriptor(tenant)).await else { continue };
        while !stop.load(Relaxed) {
            let hashes = prompt(&mut rng, tenant);
            let outcome = async {
                if let Some(source) = &pull_from {
                    let op = Op::Pull(pb::Pull {
                        handle: ns.handle,
                        source: source.clone(),
                        hashes: hashes.clone(),
                        parent: Bytes::new(),
                    });
                    if let response::Result::Pull(r) = c.call(op).await? {
                        k.pulls.fetch_add(1, Relaxed);
                        k.pulled_blocks.fetch_add(r.pulled as u64, Relaxed);
                    }
                } else if rng.below(2) == 0 {
                    let blocks: Vec<Vec<u8>> = hashes.iter().map(|h| testdata::block(h, BLOCK as usize)).collect();
                    let refs: Vec<&[u8]> = blocks.iter().map(|b| &b[..]).collect();
                    let r = c.save(&ns, &hashes, &refs).await?;
                    k.saves.fetch_add(1, Relaxed);
                    k.saved_blocks.fetch_add(r.stored as u64, Relaxed);
                }
                load_verified(&mut c, &ns, &hashes, &k).await
            }
            .await;
            if outcome.is_err() {
                k.client_errors.fetch_add(1, Relaxed);
                break;
            }
        }
    }
}

/// A hostile client: garbage frames, frames too large, ops before Hello, bad sizes, floods of
/// registrations; each closes only its own connection.
async fn hostile(id: u64, socket: Arc<Mutex<std::path::PathBuf>>, stop: Arc<AtomicBool>, k: Arc<Counters>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut rng = Rng(0xbad_5eed + id);
    while !stop.load(Relaxed) {
        let path = socket.lock().unwrap().clone();
        let Ok(mut s) = tokio::net::UnixStream::connect(&path).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let frame = |op: Op| kvtier_proto::frame::encode(&pb::Request { id: 1, op: Some(op) });
        let hello = frame(Op::Hello(pb::Hello { client_name: "hostile".into(), protocol_version: 1, engine: None }));
        let bad: Vec<u8> = match rng.below(6) {
            0 => (0..rng.below(512)).map(|_| rng.next() as u8).collect(),
            1 => u32::MAX.to_le_bytes().to_vec(),
            2 => frame(Op::Stats(pb::Stats {})),
            3 => [
                hello,
                frame(Op::Register(pb::Register {
                    namespace: Some(NamespaceDescriptor { block_bytes: u64::MAX - rng.below(9), ..descriptor(9) }),
                })),
            ]
            .concat(),
            4 => {
                let mut v = hello;
                for i in 0..80 {
                    v.extend(frame(Op::Register(pb::Register {
                        namespace: Some(NamespaceDescriptor { model: format!("flood-{id}-{i}"), ..descriptor(9) }),
                    })));
                }
                v
            }
            _ => [hello, frame(Op::Acquire(pb::Acquire { handle: 7, hashes: vec![Bytes::from(vec![0u8; 40])] }))]
                .concat(),
        };
        let _ = s.write_all(&bad).await;
        let mut sink = vec![0u8; 1 << 16];
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut sink)).await;
        k.bad_inputs.fetch_add(1, Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Engines killed mid-save: `kvtier put` processes SIGKILLed after a random moment.
async fn engine_killer(socket: Arc<Mutex<std::path::PathBuf>>, stop: Arc<AtomicBool>, k: Arc<Counters>) {
    let mut rng = Rng(0xdead);
    while !stop.load(Relaxed) {
        let path = socket.lock().unwrap().clone();
        let child = std::process::Command::new(bin("kvtier"))
            .args([
                "put",
                "--count",
                "128",
                "--block-bytes",
                &BLOCK.to_string(),
                "--seed",
                &rng.below(1000).to_string(),
            ])
            .env("KVTIER_SOCKET", &path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if let Ok(mut child) = child {
            tokio::time::sleep(Duration::from_millis(rng.below(300))).await;
            let _ = child.kill();
            let _ = child.wait();
            k.engine_kills.fetch_add(1, Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn disk_flags(spill: &std::path::Path) -> Vec<String> {
    let s = spill.display().to_string();
    [
        "--pool-bytes",
        "96 MiB",
        "--slab-bytes",
        "4 MiB",
        "--disk-dir",
        &s,
        "--disk-bytes-per-dir",
        "128 MiB",
        "--disk-admission",
        "always",
        "--disk-optional",
        "--transfer",
        "--ucx-transports",
        "tcp",
        "--transfer-net-devices",
        "lo",
        "--stall-after-secs",
        "20",
    ]
    .map(String::from)
    .to_vec()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn main() {
    let minutes = arg("--minutes", 30);
    let clients = arg("--clients", 32);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut fs = LoopFs::new(192);
    let mut spill = fs.mount.join("spill");
    std::fs::create_dir(&spill).unwrap();
    let mut a = Daemon::start_with_metrics(&strs(&disk_flags(&spill)), true);
    let peer = [&["--pool-bytes", "96 MiB", "--slab-bytes", "4 MiB"][..], TRANSFER_OVER_TCP].concat();
    let mut b = Daemon::start_with_metrics(&peer, true);
    std::thread::sleep(Duration::from_secs(1));
    let mut base = [(a.rss_kib(), open_fds(a.pid())), (b.rss_kib(), open_fds(b.pid()))];
    let mut pids = [a.pid(), b.pid()];
    let k = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (sock_a, sock_b) = (Arc::new(Mutex::new(a.socket.clone())), Arc::new(Mutex::new(b.socket.clone())));
    println!("soak: {clients} clients for {minutes} min on two daemons (disk tier and daemon-to-daemon transfer on)");
    let mut tasks = Vec::new();
    for id in 0..clients {
        let (stop, k) = (Arc::clone(&stop), Arc::clone(&k));
        tasks.push(match id % 8 {
            6 => rt.spawn(engine(id, Arc::clone(&sock_b), Some(a.grpc.clone()), stop, k)),
            7 => rt.spawn(hostile(id, Arc::clone(&sock_a), stop, k)),
            _ => rt.spawn(engine(id, Arc::clone(&sock_a), None, stop, k)),
        });
    }
    tasks.push(rt.spawn(engine_killer(Arc::clone(&sock_a), Arc::clone(&stop), Arc::clone(&k))));

    // Chaos, every `step`: kill -9 a daemon, fill the disk, free it, and (once, late) fail it.
    let started = Instant::now();
    let end = started + Duration::from_secs(minutes * 60);
    let step = Duration::from_secs((minutes * 60 / 12).max(10));
    // The last daemons serve the final step without a fault, so that what they hold at the end
    // is compared with where they started.
    let end_of_faults = end - step;
    let mut peak = base;
    let mut round = 0;
    while Instant::now() < end {
        let next = (Instant::now() + step).min(end);
        while Instant::now() < next {
            std::thread::sleep(Duration::from_secs(5));
            for (i, d) in [&a, &b].into_iter().enumerate() {
                peak[i].0 = peak[i].0.max(d.rss_kib());
                peak[i].1 = peak[i].1.max(open_fds(d.pid()));
            }
            assert!(a.is_running() && b.is_running(), "a daemon died:\n{}\n{}", a.log(), b.log());
        }
        if Instant::now() >= end_of_faults {
            continue;
        }
        round += 1;
        let t = started.elapsed().as_secs();
        match round % 4 {
            1 => {
                a.restart();
                k.daemon_kills.fetch_add(1, Relaxed);
                println!("{t:>5} s: kill -9 and restart of the disk daemon");
            }
            2 => {
                fs.fill();
                k.disk_fills.fetch_add(1, Relaxed);
                println!("{t:>5} s: disk filled");
            }
            3 => {
                let _ = std::fs::remove_file(fs.mount.join("filler"));
                b.restart();
                a.restart();
                k.daemon_kills.fetch_add(2, Relaxed);
                println!("{t:>5} s: disk freed; kill -9 and restart of both daemons");
            }
            _ if round >= 8 && k.disk_failures.load(Relaxed) == 0 => {
                fs.shut_down();
                k.disk_failures.fetch_add(1, Relaxed);
                println!("{t:>5} s: disk fails (every I/O: EIO)");
                std::thread::sleep(step / 2);
                fs = LoopFs::new(192);
                spill = fs.mount.join("spill");
                std::fs::create_dir(&spill).unwrap();
                a.restart_with(&strs(&disk_flags(&spill)));
                k.daemon_kills.fetch_add(1, Relaxed);
                println!("{t:>5} s: the disk daemon restarted on a new disk");
            }
            _ => {
                b.restart();
                k.daemon_kills.fetch_add(1, Relaxed);
                println!("{t:>5} s: kill -9 and restart of the pulling daemon");
            }
        }
        *sock_a.lock().unwrap() = a.socket.clone();
        *sock_b.lock().unwrap() = b.socket.clone();
        // What each daemon instance starts from: the end of the run is compared with it.
        std::thread::sleep(Duration::from_secs(1));
        for (i, d) in [&a, &b].into_iter().enumerate() {
            if d.pid() != pids[i] {
                (pids[i], base[i]) = (d.pid(), (d.rss_kib(), open_fds(d.pid())));
            }
        }
    }
    stop.store(true, Relaxed);
    rt.block_on(async {
        for t in tasks {
            let _ = t.await;
        }
    });
    drop(rt);

    // Everything released: no connection, no reservation, nothing pinned (Discard finds no busy
    // block and leaves the pool empty), RSS and fds back near where they were.
    std::thread::sleep(Duration::from_secs(3));
    let mut failed = Vec::new();
    for (name, d, (rss0, fds0)) in [("disk daemon", &a, base[0]), ("pulling daemon", &b, base[1])] {
        let clients = d.metric("kvtier_connected_clients");
        let reserved = d.metric("kvtier_host_reserved_blocks");
        let out = d.kvtier(&["discard", "--all", "--json", "--wait", "60"]);
        let discard: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let used = d.metric("kvtier_host_used_bytes");
        let (rss, fds) = (d.rss_kib(), open_fds(d.pid()));
        println!(
            "{name}: clients {clients}, reserved {reserved}, discard busy {}, used after discard {used} B, RSS {rss0} -> {rss} KiB, fds {fds0} -> {fds}",
            discard["busy_blocks"]
        );
        if clients != 0.0 || reserved != 0.0 || discard["busy_blocks"].as_u64() != Some(0) || used != 0.0 {
            failed.push(format!("{name}: something is still held"));
        }
        if rss > rss0 + 64 * 1024 {
            failed.push(format!("{name}: RSS {rss0} -> {rss} KiB"));
        }
        if fds > fds0 + 8 {
            failed.push(format!("{name}: fds {fds0} -> {fds}"));
        }
    }
    let g = |c: &AtomicU64| c.load(Relaxed);
    let secs = started.elapsed().as_secs_f64();
    println!(
        "held {clients} clients for {:.1} min: {} saves ({} blocks), {} loads ({} blocks, {:.2} GB verified byte by byte), {} pulls ({} blocks); {:.0} ops/s",
        secs / 60.0,
        g(&k.saves),
        g(&k.saved_blocks),
        g(&k.loads),
        g(&k.loaded_blocks),
        g(&k.verified_bytes) as f64 / 1e9,
        g(&k.pulls),
        g(&k.pulled_blocks),
        (g(&k.saves) + g(&k.loads) + g(&k.pulls)) as f64 / secs
    );
    println!(
        "survived: {} daemon kill -9s, {} engine kill -9s, {} disk fills, {} disk failures, {} hostile inputs; clients saw {} errors and reconnected {} times",
        g(&k.daemon_kills),
        g(&k.engine_kills),
        g(&k.disk_fills),
        g(&k.disk_failures),
        g(&k.bad_inputs),
        g(&k.client_errors),
        g(&k.reconnects)
    );
    println!("peak RSS {} / {} KiB, peak fds {} / {}", peak[0].0, peak[1].0, peak[0].1, peak[1].1);
    println!("wrong blocks loaded: {}", g(&k.wrong_blocks));
    if g(&k.wrong_blocks) > 0 {
        failed.push(format!("{} wrong blocks loaded", g(&k.wrong_blocks)));
    }
    if !failed.is_empty() {
        eprintln!("SOAK FAILED: {failed:?}");
        std::process::exit(1);
    }
    println!("soak passed");
}
