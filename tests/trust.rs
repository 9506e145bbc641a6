//! The trust report's findings (issue 20, `shared/repro/`), each against a real daemon: what a
//! hostile or careless local client, or a caller of the gRPC plane, could do before, and what it
//! can do now. Every test here failed on the daemon the report was written against.

use kvtier_client::testdata;
use kvtier_proto::frame::encode;
use kvtier_proto::v1::{self as pb, request::Op, response, ErrorCode};
use kvtier_tests::{blocks_for, eventually, namespace, ok_stdout, refs, Daemon, TRANSFER_OVER_TCP};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use prost::Message;
use std::io::{IoSliceMut, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// A raw connector connection that keeps the fds the daemon passes.
struct Raw {
    s: UnixStream,
    next: u64,
}

impl Raw {
    fn connect(d: &Daemon) -> Self {
        let s = UnixStream::connect(&d.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Self { s, next: 1 }
    }

    /// Sends `op`; returns the reply and any fds that came with it.
    fn call(&mut self, op: Op) -> (pb::Response, Vec<OwnedFd>) {
        self.next += 1;
        self.s.write_all(&encode(&pb::Request { id: self.next, op: Some(op) })).unwrap();
        self.reply()
    }

    fn reply(&mut self) -> (pb::Response, Vec<OwnedFd>) {
        let mut buf = vec![0u8; 1 << 16];
        let mut got = Vec::new();
        let mut fds = Vec::new();
        loop {
            if got.len() >= 4 {
                let len = u32::from_le_bytes(got[..4].try_into().unwrap()) as usize;
                if got.len() >= 4 + len {
                    return (pb::Response::decode(&got[4..4 + len]).unwrap(), fds);
                }
            }
            let mut cmsg = nix::cmsg_space!([RawFd; 16]);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(self.s.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC).unwrap();
            for c in msg.cmsgs().unwrap() {
                if let ControlMessageOwned::ScmRights(list) = c {
                    // Each is a new descriptor this process owns.
                    fds.extend(list.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
            let n = msg.bytes;
            assert!(n > 0, "the daemon closed the connection");
            got.extend_from_slice(&buf[..n]);
        }
    }

    fn hello(&mut self) -> (pb::HelloReply, Vec<OwnedFd>) {
        match self.call(Op::Hello(pb::Hello { client_name: "hostile".into(), protocol_version: 1, engine: None })) {
            (pb::Response { result: Some(response::Result::Hello(h)), .. }, fds) => (h, fds),
            (other, _) => panic!("{other:?}"),
        }
    }
}

/// Lets this process hold thousands of sockets (soft limit up to the hard one).
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

fn error_of(resp: &pb::Response) -> (ErrorCode, String) {
    match &resp.result {
        Some(response::Result::Error(e)) => (e.code(), e.reason.clone()),
        other => panic!("expected an error, got {other:?}"),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Bytes no honest block holds: a victim's blocks are made of it.
const SECRET: &[u8] = b"TENANT-A-SECRET-KV-";

fn secret_block(i: usize, len: usize) -> Vec<u8> {
    let mut b: Vec<u8> = SECRET.iter().chain(&[i as u8]).copied().cycle().take(len).collect();
    b[len - 1] = i as u8;
    b
}

/// Resident bytes of the daemon's pool mappings (/proc/PID/smaps, `kvtier-pool-*`).
fn pool_resident_kib(d: &Daemon) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", d.pid())).unwrap();
    let mut in_pool = false;
    let mut kib = 0;
    for line in smaps.lines() {
        if line.contains(" /memfd:") {
            in_pool = line.contains("kvtier-pool-");
        } else if let (true, Some(v)) = (in_pool, line.strip_prefix("Rss:")) {
            kib += v.split_whitespace().next().unwrap().parse::<u64>().unwrap();
        }
    }
    kib
}

#[test]
fn a_hostile_client_reaches_nothing_but_its_own_window() {
    // Finding 4: any client that sent Hello received the pool, read another tenant's committed
    // blocks and overwrote them. Finding 5: punching holes in a received pool memfd made
    // committed blocks read back as zeros and freed locked pages.
    let spill = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let flags = ["--disk-dir", spill.path().to_str().unwrap(), "--disk-bytes-per-dir", "32 MiB"];
    let d = Daemon::start_with_metrics(&flags, true);
    let rt = runtime();
    let block_bytes = 65536;
    let victim_ns = kvtier_client::NamespaceDescriptor { cache_salt: "tenant-a".into(), ..namespace("m", block_bytes) };
    let hashes = testdata::chained_hashes(77, 16);
    let blocks: Vec<Vec<u8>> = (0..16).map(|i| secret_block(i, block_bytes as usize)).collect();
    let mut victim = rt.block_on(d.client("victim"));
    let ns = rt.block_on(victim.register(victim_ns.clone())).unwrap();
    assert!(victim.hello().staged, "clients are not trusted by default");
    assert_eq!(rt.block_on(victim.save(&ns, &hashes, &refs(&blocks))).unwrap().stored, 16);
    let pool_before = pool_resident_kib(&d);

    // The hostile client: what it is handed is one window of its own.
    let mut h = Raw::connect(&d);
    let (hello, fds) = h.hello();
    assert!(hello.staged && hello.segments.len() == 1 && fds.len() == 1, "{hello:?}, {} fds", fds.len());
    let fd = &fds[0];
    let name = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
    assert!(name.to_string_lossy().contains("kvtier-staging"), "{name:?}");
    let len = hello.segments[0].bytes as usize;
    let file = std::fs::File::from(fd.try_clone().unwrap());
    assert_eq!(file.metadata().unwrap().len() as usize, len);
    // SAFETY: a shared mapping of the received memfd, of its size, used only here.
    let map = unsafe { memmap2::MmapOptions::new().len(len).map_mut(&file).unwrap() };
    let mut map = map;
    // It registers, saves and loads in its own namespace through the window.
    let (resp, _) = h.call(Op::Register(pb::Register { namespace: Some(namespace("mine", block_bytes)) }));
    let Some(response::Result::Register(reg)) = resp.result else { panic!("{resp:?}") };
    let own = testdata::chained_hashes(5, 4);
    let (resp, _) =
        h.call(Op::Reserve(pb::Reserve { handle: reg.handle, hashes: own.clone(), parent: Default::default() }));
    let Some(response::Result::Reserve(res)) = resp.result else { panic!("{resp:?}") };
    assert_eq!(res.offsets.len(), 4);
    for (i, &off) in res.offsets.iter().enumerate() {
        map[off as usize..off as usize + block_bytes as usize].fill(i as u8 + 1);
    }
    h.call(Op::Commit(pb::Commit { reservation: res.reservation }));
    // Nothing of the victim is in reach: not in the window, whatever the client asks for.
    let (resp, _) = h.call(Op::Acquire(pb::Acquire { handle: reg.handle, hashes: hashes.clone() }));
    assert!(matches!(resp.result, Some(response::Result::Acquire(ref a)) if a.lease == 0), "{resp:?}");
    let (resp, _) = h.call(Op::Acquire(pb::Acquire { handle: reg.handle, hashes: own.clone() }));
    let Some(response::Result::Acquire(acq)) = resp.result else { panic!("{resp:?}") };
    assert_eq!(acq.offsets.len(), 4);
    let at = acq.offsets[2] as usize;
    assert!(map[at..at + block_bytes as usize].iter().all(|&b| b == 3), "its own block comes back");
    assert!(!map.windows(SECRET.len()).any(|w| w == SECRET), "another tenant's bytes are never in the window");

    // Everything it can do to what it received hurts only itself.
    map.fill(0xee);
    assert!(file.set_len(4096).is_err(), "truncate: sealed");
    assert!(file.set_len(len as u64 * 2).is_err(), "grow: sealed");
    let punch = nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
    nix::fcntl::fallocate(file.as_fd(), punch, 0, len as i64).expect("its own window: allowed");
    assert!(map.iter().all(|&b| b == 0), "punched: zeros, in its own window");
    // SAFETY: remapping our own mapping, larger; touching past the file's end would SIGBUS this
    // process only (the daemon maps its own view, of the sealed size).
    let grown = unsafe { libc::mremap(map.as_mut_ptr().cast(), len, 2 * len, libc::MREMAP_MAYMOVE) };
    assert_ne!(grown, libc::MAP_FAILED);
    assert_eq!(file.metadata().unwrap().len() as usize, len, "mremap does not grow the file");
    // SAFETY: an mmap of twice the file's size: allowed, and again it cannot grow the file.
    let beyond = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            2 * len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    assert_ne!(beyond, libc::MAP_FAILED);
    assert_eq!(file.metadata().unwrap().len() as usize, len);
    std::mem::forget(map); // remapped above; unmapped by hand
                           // SAFETY: the two mappings made above, unmapped once.
    unsafe {
        libc::munmap(grown, 2 * len);
        libc::munmap(beyond, 2 * len);
    }
    drop(h);

    // The victim's blocks are exact, the daemon's pool still all resident, the daemon serving.
    let mut got = Vec::new();
    rt.block_on(victim.load(&ns, &hashes, |_, b| got.push(b.to_vec()))).unwrap();
    assert_eq!(got, blocks);
    assert!(
        pool_resident_kib(&d) >= pool_before,
        "no pool page was freed ({} < {pool_before} KiB)",
        pool_resident_kib(&d)
    );
    let mut other = rt.block_on(d.client("other"));
    let ns2 = rt.block_on(other.register(victim_ns)).unwrap();
    let mut again = Vec::new();
    rt.block_on(other.load(&ns2, &hashes, |_, b| again.push(b.to_vec()))).unwrap();
    assert_eq!(again, blocks, "another client of the same tenant loads them exactly");
}

#[test]
fn a_trusted_uid_maps_the_pool_itself() {
    // The one-copy path, for engines the operator trusts (docs/security.md says what they can do).
    let d = Daemon::start(&["--trusted-uid", "0"]);
    let mut h = Raw::connect(&d);
    let (hello, fds) = h.hello();
    assert!(!hello.staged && !fds.is_empty() && fds.len() == hello.segments.len(), "{hello:?}");
    let name = std::fs::read_link(format!("/proc/self/fd/{}", fds[0].as_raw_fd())).unwrap();
    assert!(name.to_string_lossy().contains("kvtier-pool-0"), "{name:?}");
}

#[test]
fn overflowing_block_sizes_are_refused_and_the_descriptor_stays_usable() {
    // Finding 2: 2^64-1 passed the size check (the stride wrapped to 0), the next Reserve
    // panicked a worker, and the namespace id then refused every correct registration.
    let d = Daemon::start(&[]);
    for bad in [u64::MAX, u64::MAX - 4094, 1 << 63] {
        let mut h = Raw::connect(&d);
        h.hello();
        let (resp, _) = h.call(Op::Register(pb::Register { namespace: Some(namespace("m", bad)) }));
        assert_eq!(error_of(&resp).0, ErrorCode::WrongBlockSize, "{bad}");
    }
    let rt = runtime();
    let mut c = rt.block_on(d.client("after"));
    let ns = rt.block_on(c.register(namespace("m", 4096))).unwrap();
    let hashes = testdata::chained_hashes(1, 4);
    let blocks = blocks_for(&hashes, 4096);
    assert_eq!(rt.block_on(c.save(&ns, &hashes, &refs(&blocks))).unwrap().stored, 4);
    assert!(d.log().lines().all(|l| !l.contains("panicked")), "{}", d.log());
}

fn config_file(d: &tempfile::TempDir, toml: &str) -> String {
    let path = d.path().join("kvtierd.toml");
    std::fs::write(&path, toml).unwrap();
    path.display().to_string()
}

#[test]
fn one_client_cannot_exhaust_the_namespace_table() {
    // Finding 3: 250 registrations filled the fixed table; every new model then got "too many
    // namespaces" until a restart, even after `kvtier discard --all`.
    let tmp = tempfile::tempdir().unwrap();
    let config = config_file(&tmp, "[server]\nmax_namespaces = 9\nmax_namespaces_per_client = 3\n");
    let d = Daemon::start_with_metrics(&["--config", &config], true);
    let register =
        |h: &mut Raw, model: &str| h.call(Op::Register(pb::Register { namespace: Some(namespace(model, 4096)) })).0;
    // One connection: three namespaces, the fourth refused by its quota.
    let mut greedy = Raw::connect(&d);
    greedy.hello();
    for i in 0..3 {
        assert!(matches!(register(&mut greedy, &format!("g{i}")).result, Some(response::Result::Register(_))));
    }
    let (code, why) = error_of(&register(&mut greedy, "g3"));
    assert!(code == ErrorCode::ResourceExhausted && why.contains("max_namespaces_per_client"), "{why}");
    // (That closed its connection: its namespaces, empty, are free to reclaim.)
    // Many connections fill the table while they stay connected...
    let mut held: Vec<Raw> = Vec::new();
    for c in 0..3 {
        let mut h = Raw::connect(&d);
        h.hello();
        for i in 0..3 {
            let resp = register(&mut h, &format!("c{c}-{i}"));
            assert!(matches!(resp.result, Some(response::Result::Register(_))), "{resp:?}");
        }
        held.push(h);
    }
    let mut late = Raw::connect(&d);
    late.hello();
    let (code, why) = error_of(&register(&mut late, "late"));
    assert!(code == ErrorCode::ResourceExhausted && why.contains("too many namespaces"), "{why}");
    // ... and once they go, their namespaces are reclaimed for new ones, blocks or not.
    let rt = runtime();
    let mut saver = rt.block_on(d.client("saver"));
    let ns = rt.block_on(saver.register(namespace("c0-0", 4096))).unwrap();
    let hashes = testdata::chained_hashes(3, 2);
    rt.block_on(saver.save(&ns, &hashes, &refs(&blocks_for(&hashes, 4096)))).unwrap();
    drop(saver);
    drop(held);
    drop(greedy);
    eventually("every client is gone", || d.metric("kvtier_connected_clients") == 0.0);
    let mut fresh = rt.block_on(d.client("fresh"));
    for i in 0..3 {
        rt.block_on(fresh.register(namespace(&format!("new{i}"), 4096))).unwrap();
    }
    let mut more = rt.block_on(d.client("more"));
    for i in 0..3 {
        rt.block_on(more.register(namespace(&format!("more{i}"), 4096))).unwrap();
    }
    let status = ok_stdout(&d.kvtier(&["status", "--json"]));
    let json: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert!(json["counters"]["kvtier_namespaces"].as_u64().unwrap() <= 9, "{status}");
}

#[test]
fn connections_are_limited_greeted_in_time_and_cost_nothing_once_gone() {
    // Weaker spots: no cap on connections and no Hello deadline (21,000 connections: `kvtier
    // status` hung, RSS 2.2 GB and still 2.04 GB after they closed).
    let tmp = tempfile::tempdir().unwrap();
    let config = config_file(
        &tmp,
        "[server]\nmax_connections = 1200\nmax_connections_per_uid = 1100\nhello_timeout_ms = 1500\nallowed_uids = [4242]\n",
    );
    let d = Daemon::start_with_metrics(&["--config", &config], true);
    raise_fd_limit();
    // A client that never says Hello is closed with a reason.
    let mut silent = Raw::connect(&d);
    let (resp, _) = silent.reply();
    let (code, why) = error_of(&resp);
    assert!(code == ErrorCode::NotHello && why.contains("hello_timeout_ms"), "{why}");
    let baseline = d.rss_kib();
    // 1,100 greeted connections of one uid: the next one is refused at once, another uid's is
    // served, and root's `kvtier status` answers.
    let mut conns: Vec<Raw> = (0..1100)
        .map(|_| {
            let mut h = Raw::connect(&d);
            h.hello();
            h
        })
        .collect();
    let mut refused = Raw::connect(&d);
    let (resp, _) = refused.reply();
    let (code, why) = error_of(&resp);
    assert!(code == ErrorCode::ResourceExhausted && why.contains("max_connections_per_uid"), "{why}");
    let (ok, text) = d.kvtier_as(4242, &["status"]);
    assert!(ok, "another uid is served: {text}");
    let peak = d.rss_kib();
    eprintln!("RSS: {baseline} KiB at start, {peak} KiB with 1,100 idle connections");
    assert!(peak < baseline + 1100 * 16, "an idle connection costs under 16 KiB: {baseline} -> {peak} KiB");
    // A burst of requests on all of them, then all gone: RSS back near where it was.
    for h in &mut conns {
        h.call(Op::Stats(pb::Stats {}));
    }
    drop(conns);
    eventually("the connections are gone", || d.metric("kvtier_connected_clients") == 0.0);
    eventually("the heap is handed back", || d.rss_kib() < baseline + 16 * 1024);
    assert!(d.metric("kvtier_connections_refused_total") >= 1.0);
}

#[test]
fn the_grpc_plane_reveals_and_pins_nothing_without_authorization() {
    // Finding 7: the default TCP port on loopback served any uid in plain text: WatchEvents
    // named every namespace and block, Offers pinned the pool.
    let stderr = Daemon::start_refused(&["--grpc-listen", "127.0.0.1:0"]);
    assert!(stderr.contains("needs mutual TLS") && stderr.contains("--grpc-insecure"), "{stderr}");
    let d = Daemon::start_with_metrics(&["--allowed-uid", "4242"], true);
    // The unix socket checks uids as the connector does: 65534 is closed at once.
    std::fs::set_permissions(d.dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let grpc = d.dir.path().join("grpc.sock");
    std::fs::set_permissions(&grpc, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let probe = format!(
        "import os, socket\nos.setgid(65534); os.setuid(65534)\ns = socket.socket(socket.AF_UNIX); s.connect({:?})\n\
         try:\n    s.sendall(b'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n'); s.settimeout(10); print(len(s.recv(100)))\n\
         except ConnectionError:\n    print(0)\n",
        grpc.display().to_string()
    );
    let out = std::process::Command::new("python3").args(["-c", &probe]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "closed without a byte: {out:?}");
    assert_eq!(d.metric("kvtier_grpc_refused_total"), 1.0);
    // Root's router feed over the same socket works.
    let rt = runtime();
    let stats = rt.block_on(async {
        let ch = kvtier_router::feed::channel(&format!("unix:{}", grpc.display())).await.unwrap();
        pb::cache_service_client::CacheServiceClient::new(ch).stats(pb::NodeStatsRequest {}).await
    });
    assert!(stats.is_ok(), "{stats:?}");
}

#[test]
fn offers_pin_at_most_their_callers_share() {
    let tmp = tempfile::tempdir().unwrap();
    // `[peer]`: the section's name in earlier releases, still read as `[transfer]`.
    let config = config_file(&tmp, "[peer]\noffer_caller_share = 0.25\noffer_pool_share = 0.5\n");
    let d = Daemon::start_with_metrics(&[&["--config", config.as_str()][..], TRANSFER_OVER_TCP].concat(), true);
    let rt = runtime();
    let mut c = rt.block_on(d.client("saver"));
    let ns = rt.block_on(c.register(namespace("m", 1 << 20))).unwrap();
    let hashes = testdata::chained_hashes(9, 24);
    assert_eq!(rt.block_on(c.save(&ns, &hashes, &refs(&blocks_for(&hashes, 1 << 20)))).unwrap().stored, 24);
    let offer = |hashes: &[bytes::Bytes]| {
        rt.block_on(async {
            let ch = kvtier_router::feed::channel(&d.grpc).await.unwrap();
            let mut t = pb::transfer_service_client::TransferServiceClient::new(ch);
            let r = pb::OfferRequest { namespace_id: ns.id.clone(), hashes: hashes.to_vec() };
            t.offer(r).await.unwrap().into_inner()
        })
    };
    // 32 MiB pool: a caller may pin 8 blocks of 1 MiB; the same blocks again cost nothing more.
    assert_eq!(offer(&hashes).blocks, 8);
    assert_eq!(offer(&hashes[..4]).blocks, 4, "already pinned by this caller's offer");
    assert_eq!(offer(&hashes[8..]).blocks, 0, "over its share");
    assert!(d.metric("kvtier_peer_offers_limited_total") >= 2.0);
    // Saves still find room: the rest of the pool is not pinned.
    let fresh = testdata::chained_hashes(10, 8);
    assert_eq!(rt.block_on(c.save(&ns, &fresh, &refs(&blocks_for(&fresh, 1 << 20)))).unwrap().stored, 8);
}

#[test]
fn small_things_the_report_found() {
    let d = Daemon::start(&[]);
    // A 33-byte parent is named as the parent, not as "hash 0".
    let mut h = Raw::connect(&d);
    h.hello();
    let (resp, _) = h.call(Op::Register(pb::Register { namespace: Some(namespace("m", 4096)) }));
    let Some(response::Result::Register(reg)) = resp.result else { panic!("{resp:?}") };
    let hashes = testdata::chained_hashes(1, 1);
    let parent = bytes::Bytes::from(vec![7u8; 33]);
    let (resp, _) = h.call(Op::Reserve(pb::Reserve { handle: reg.handle, hashes, parent }));
    let (code, why) = error_of(&resp);
    assert!(code == ErrorCode::BadArgument && why.starts_with("parent hash has 33 bytes"), "{why}");
    // Loads that no Lookup announced count in the hit rate (they were ignored: 0 of 0 blocks).
    ok_stdout(&d.kvtier(&["put", "--count", "8"]));
    ok_stdout(&d.kvtier(&["get", "--count", "10"]));
    let status: serde_json::Value = serde_json::from_str(&ok_stdout(&d.kvtier(&["status", "--json"]))).unwrap();
    assert_eq!(
        (
            status["counters"]["kvtier_hit_blocks_total"].as_u64(),
            status["counters"]["kvtier_miss_blocks_total"].as_u64()
        ),
        (Some(8), Some(2)),
        "{status}"
    );
    let looked = ok_stdout(&d.kvtier(&["lookup", "--count", "8"]));
    assert!(looked.contains("matched 8"), "{looked}");
    let status: serde_json::Value = serde_json::from_str(&ok_stdout(&d.kvtier(&["status", "--json"]))).unwrap();
    assert_eq!(status["counters"]["kvtier_hit_blocks_total"].as_u64(), Some(16), "a Lookup counts once: {status}");
    // `kvtier status | head` ends quietly (it panicked on the broken pipe).
    let cli = kvtier_tests::bin("kvtier");
    let script = format!("set -o pipefail; {} status | head -c 1 >/dev/null", cli.display());
    let out =
        std::process::Command::new("bash").args(["-c", &script]).env("KVTIER_SOCKET", &d.socket).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    // A client's window pages go back to the kernel when it idles.
    let mut c = Raw::connect(&d);
    let (hello, fds) = c.hello();
    assert!(hello.staged);
    let file = std::fs::File::from(fds.into_iter().next().unwrap());
    let (resp, _) = c.call(Op::Register(pb::Register { namespace: Some(namespace("m", 65536)) }));
    let Some(response::Result::Register(reg)) = resp.result else { panic!("{resp:?}") };
    let blocks = testdata::chained_hashes(2, 64);
    let (resp, _) = c.call(Op::Reserve(pb::Reserve { handle: reg.handle, hashes: blocks, parent: Default::default() }));
    let Some(response::Result::Reserve(res)) = resp.result else { panic!("{resp:?}") };
    for &off in &res.offsets {
        file.write_all_at(&[1u8; 65536], off).unwrap();
    }
    let allocated = |f: &std::fs::File| std::os::unix::fs::MetadataExt::blocks(&f.metadata().unwrap());
    assert!(allocated(&file) >= 64 * 128, "the writes gave the window pages");
    c.call(Op::Abort(pb::Abort { reservation: res.reservation }));
    eventually("the idle window is trimmed", || allocated(&file) == 0);
}
