//! Daemon-side copies (`device.backend = "cma"`): a real kvtierd reads and writes this test
//! process's "KV tensors" itself (process_vm_readv/writev), byte-exact and interchangeable with
//! blocks saved and loaded through the shared pool; bad registrations close only their
//! connection, unreachable memory is a soft error and nothing partial becomes visible.

use bytes::Bytes;
use kvtier_client::{testdata, Client, ClientError, Namespace};
use kvtier_proto::v1::{self as pb, ErrorCode};
use kvtier_tests::{flash_attention_kv_cache, namespace, refs, Daemon};

const LAYERS: usize = 4;
const BLOCKS: u64 = 32;
const CHUNK: u64 = 4096;
const BLOCK_BYTES: u64 = LAYERS as u64 * 2 * CHUNK;

/// An engine's KV cache in vLLM's FlashAttention layout: per layer `[2, BLOCKS, chunk]`.
struct Engine {
    tensors: Vec<Vec<u8>>,
}

impl Engine {
    fn new(seed: u8) -> Self {
        let len = (2 * BLOCKS * CHUNK) as usize;
        let tensors = (0..LAYERS)
            .map(|l| (0..len).map(|i| (i as u8).wrapping_mul(31) ^ (i >> 12) as u8 ^ l as u8 ^ seed).collect())
            .collect();
        Self { tensors }
    }

    fn zeroed() -> Self {
        Self { tensors: vec![vec![0u8; (2 * BLOCKS * CHUNK) as usize]; LAYERS] }
    }

    fn chunk(kv: u64, block: u64) -> std::ops::Range<usize> {
        let at = ((kv * BLOCKS + block) * CHUNK) as usize;
        at..at + CHUNK as usize
    }

    /// Block `block` as kvtier stores it: chunk (layer, part) at `(layer * 2 + part) * CHUNK`.
    fn block(&self, block: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(BLOCK_BYTES as usize);
        for l in 0..LAYERS {
            for kv in 0..2 {
                out.extend_from_slice(&std::hint::black_box(&self.tensors[l])[Self::chunk(kv, block)]);
            }
        }
        out
    }

    fn registration(&self, handle: u32) -> pb::RegisterKvCache {
        let tensors: Vec<&[u8]> = self.tensors.iter().map(|t| &t[..]).collect();
        flash_attention_kv_cache(handle, &tensors, BLOCKS, CHUNK)
    }
}

async fn engine_client(d: &Daemon, engine: &Engine) -> (Client, Namespace, u32) {
    let mut c = d.client("engine").await;
    assert_eq!((c.hello().device_backend.as_str(), c.hello().device_dma), ("cma", true));
    let ns = c.register(namespace("m", BLOCK_BYTES)).await.unwrap();
    let reply = c.register_kv_cache(engine.registration(ns.handle)).await.unwrap();
    assert_eq!(reply.error, "", "the daemon reaches this process's memory");
    (c, ns, reply.cache)
}

fn save(cache: u32, hashes: &[Bytes], block_ids: &[u64]) -> pb::SaveKv {
    pb::SaveKv { cache, hashes: hashes.to_vec(), block_ids: block_ids.to_vec(), ..Default::default() }
}

fn load(cache: u32, hashes: &[Bytes], block_ids: &[u64]) -> pb::LoadKv {
    pb::LoadKv { cache, hashes: hashes.to_vec(), block_ids: block_ids.to_vec(), ..Default::default() }
}

#[tokio::test]
async fn the_daemon_saves_and_loads_engine_blocks_byte_exact_and_interchangeably_with_pool_copies() {
    let d = Daemon::start_with_metrics(&["--device-backend", "cma"], true);
    let engine = Engine::new(7);
    let (mut c, ns, cache) = engine_client(&d, &engine).await;
    let hashes = testdata::chained_hashes(3, 12);
    let ids: Vec<u64> = (0..12).map(|k| (k * 5 + 3) % BLOCKS).collect();
    let r = c.save_kv(save(cache, &hashes, &ids)).await.unwrap();
    assert_eq!((r.saved, r.present, r.no_space, r.error.as_str()), (12, 0, 0, ""));
    // Another client loads them through the shared pool: every block as the layout defines it.
    let mut reader = d.client("reader").await;
    let ns_r = reader.register(namespace("m", BLOCK_BYTES)).await.unwrap();
    let mut pooled = Vec::new();
    reader.load(&ns_r, &hashes, |_, b| pooled.push(b.to_vec())).await.unwrap();
    let want: Vec<Vec<u8>> = ids.iter().map(|&b| engine.block(b)).collect();
    assert!(pooled == want, "pool slots hold the engine blocks in kvtier's layout");
    assert_eq!(c.save_kv(save(cache, &hashes, &ids)).await.unwrap().present, 12);

    // Load into other engine blocks of a zeroed cache: exactly those blocks change.
    let target = Engine::zeroed();
    let reply = c.register_kv_cache(target.registration(ns.handle)).await.unwrap();
    assert_eq!(reply.error, "");
    let mut longer = hashes.clone();
    longer.extend(testdata::chained_hashes(99, 2));
    let to: Vec<u64> = (0..14).rev().collect();
    let r = c.load_kv(load(reply.cache, &longer, &to)).await.unwrap();
    assert_eq!((r.loaded, r.error.as_str()), (12, ""));
    for b in 0..BLOCKS {
        let got = target.block(b);
        match to[..12].iter().position(|&t| t == b) {
            Some(k) => assert!(got == want[k], "engine block {b} holds saved block {k}"),
            None => assert!(got.iter().all(|&x| x == 0), "engine block {b} untouched"),
        }
    }

    // Blocks saved through the pool load into the engine by the daemon, and the reverse above.
    let other = testdata::chained_hashes(5, 3);
    let bytes: Vec<Vec<u8>> = (0..3).map(|k| Engine::new(k as u8 + 40).block(k)).collect();
    reader.save(&ns_r, &other, &refs(&bytes)).await.unwrap();
    let r = c.load_kv(load(reply.cache, &other, &[20, 21, 22])).await.unwrap();
    assert_eq!(r.loaded, 3);
    for k in 0..3 {
        assert!(target.block(20 + k) == bytes[k as usize], "pool-saved block {k} loaded by the daemon");
    }
    assert_eq!(d.metric("kvtier_device_saved_bytes_total"), (12 * BLOCK_BYTES) as f64);
    assert_eq!(d.metric("kvtier_device_loaded_bytes_total"), (15 * BLOCK_BYTES) as f64);
}

/// Sends `op` on a fresh engine connection and expects the daemon to close it with `code`.
async fn expect_fatal(d: &Daemon, engine: &Engine, code: ErrorCode, op: impl FnOnce(u32, u32) -> pb::request::Op) {
    let (mut c, ns, cache) = engine_client(d, engine).await;
    match c.call(op(ns.handle, cache)).await {
        Err(ClientError::Daemon { code: got, reason }) => {
            assert_eq!(got, code, "{reason}");
            assert!(!reason.is_empty());
        }
        other => panic!("expected {code:?}, got {other:?}"),
    }
    assert!(c.stats().await.is_err(), "the connection was closed");
}

#[tokio::test]
async fn bad_registrations_and_requests_close_only_their_connection() {
    use pb::request::Op;
    let d = Daemon::start(&["--device-backend", "cma"]);
    let engine = Engine::new(1);
    let mut bystander = d.client("bystander").await;
    let hashes = testdata::chained_hashes(1, 2);
    // Chunks reaching past a tensor; a block size other than the namespace's; hostile sizes.
    let mut outside = engine.registration(0);
    outside.tensors[2].bytes -= 1;
    expect_fatal(&d, &engine, ErrorCode::BadArgument, |_, _| Op::RegisterKvCache(outside)).await;
    let mut wrong = engine.registration(0);
    wrong.chunk_bytes = CHUNK / 2;
    expect_fatal(&d, &engine, ErrorCode::BadArgument, |_, _| Op::RegisterKvCache(wrong)).await;
    let mut hostile = engine.registration(0);
    hostile.num_blocks = u64::MAX;
    hostile.layers[0].block_stride = u64::MAX / 3;
    expect_fatal(&d, &engine, ErrorCode::BadArgument, |_, _| Op::RegisterKvCache(hostile)).await;
    let mut unregistered = engine.registration(0);
    unregistered.handle = 5;
    expect_fatal(&d, &engine, ErrorCode::UnregisteredNamespace, |_, _| Op::RegisterKvCache(unregistered)).await;
    // A block id past the cache, lists of different lengths, a cache never registered.
    let h = hashes.clone();
    expect_fatal(&d, &engine, ErrorCode::BadArgument, |_, c| Op::SaveKv(save(c, &h, &[0, BLOCKS]))).await;
    expect_fatal(&d, &engine, ErrorCode::BadArgument, |_, c| Op::LoadKv(load(c, &h, &[0]))).await;
    expect_fatal(&d, &engine, ErrorCode::UnknownId, |_, c| Op::SaveKv(save(c + 1, &h, &[0, 1]))).await;
    // A request whose plan would be too big (129 blocks x 65,536 one-byte chunks).
    let mut wide = d.client("wide").await;
    let ns = wide.register(namespace("wide", 65536)).await.unwrap();
    let tensor = vec![0u8; 400];
    let mut reg = flash_attention_kv_cache(ns.handle, &[&tensor], 200, 1);
    reg.layers = vec![reg.layers[0]; 32768];
    assert_eq!(wide.register_kv_cache(reg).await.unwrap().error, "");
    let many = testdata::chained_hashes(2, 129);
    match wide.save_kv(save(0, &many, &vec![0; 129])).await {
        Err(ClientError::Daemon { code: ErrorCode::BadArgument, reason }) => {
            assert!(reason.contains("split"), "{reason}")
        }
        other => panic!("expected BAD_ARGUMENT, got {other:?}"),
    }
    // The daemon and the bystander carried on.
    assert!(bystander.stats().await.is_ok());
    assert!(d.client("after").await.stats().await.is_ok());
}

#[tokio::test]
async fn unreachable_memory_is_a_soft_error_and_a_failed_copy_leaves_nothing_visible() {
    let d = Daemon::start_with_metrics(&["--device-backend", "cma"], true);
    let mut c = d.client("engine").await;
    let ns = c.register(namespace("m", BLOCK_BYTES)).await.unwrap();
    // Memory that is not mapped: refused at registration, the connection stays usable.
    let len = (2 * BLOCKS * CHUNK) as usize;
    // SAFETY: an anonymous mapping this test owns; unmapped below while the daemon knows it.
    let map = unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        p
    };
    let engine = Engine::new(3);
    let mut reg = engine.registration(ns.handle);
    reg.tensors[1].address = map as u64;
    // SAFETY: unmapping our own mapping.
    unsafe { libc::munmap(map, len) };
    let r = c.register_kv_cache(reg.clone()).await.unwrap();
    assert!(r.error.contains("no longer mapped"), "{}", r.error);
    // Registered while mapped, unmapped before the save: the save fails, nothing is committed.
    // SAFETY: as above; the same address range, mapped again.
    let map = unsafe {
        libc::mmap(map, len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    assert_ne!(map, libc::MAP_FAILED);
    reg.tensors[1].address = map as u64;
    let r = c.register_kv_cache(reg).await.unwrap();
    assert_eq!(r.error, "");
    // SAFETY: as above.
    unsafe { libc::munmap(map, len) };
    let hashes = testdata::chained_hashes(8, 6);
    let ids: Vec<u64> = (0..6).collect();
    let s = c.save_kv(save(r.cache, &hashes, &ids)).await.unwrap();
    assert!(s.error.contains("no longer mapped") && s.saved == 0, "{s:?}");
    assert_eq!(c.lookup(&ns, &hashes).await.unwrap(), 0, "nothing of a failed save is visible");
    // The blocks saved another way load... into memory that is gone: a miss, said so.
    let mut other = d.client("other").await;
    let ns_o = other.register(namespace("m", BLOCK_BYTES)).await.unwrap();
    let blocks: Vec<Vec<u8>> = ids.iter().map(|&b| engine.block(b)).collect();
    other.save(&ns_o, &hashes, &refs(&blocks)).await.unwrap();
    let l = c.load_kv(load(r.cache, &hashes, &ids)).await.unwrap();
    assert!(l.loaded == 0 && l.error.contains("no longer mapped"), "{l:?}");
    assert_eq!(d.metric("kvtier_device_copy_failures_total"), 2.0);
    // The failed load's pins were dropped; the blocks stay loadable.
    let mut got = Vec::new();
    other.load(&ns_o, &hashes, |_, b| got.push(b.to_vec())).await.unwrap();
    assert!(got == blocks);
    assert!(c.stats().await.is_ok(), "soft errors keep the connection");
}

#[tokio::test]
async fn a_daemon_that_does_not_copy_says_so_at_registration() {
    let d = Daemon::start(&["--device-backend", "host"]);
    let engine = Engine::new(2);
    let mut c = d.client("engine").await;
    assert_eq!((c.hello().device_backend.as_str(), c.hello().device_dma), ("host", false));
    let ns = c.register(namespace("m", BLOCK_BYTES)).await.unwrap();
    let r = c.register_kv_cache(engine.registration(ns.handle)).await.unwrap();
    assert!(r.error.contains("does not copy engine memory"), "{}", r.error);
    assert!(c.stats().await.is_ok());
}

#[tokio::test]
async fn gpu_events_on_a_cpu_backend_are_a_soft_error_and_return_event_answers_after_the_copy() {
    let d = Daemon::start(&["--device-backend", "cma"]);
    let engine = Engine::new(9);
    let (mut c, ns, cache) = engine_client(&d, &engine).await;
    let hashes = testdata::chained_hashes(11, 4);
    let ids = [1, 2, 3, 4];
    let r = c.save_kv(save(cache, &hashes, &ids)).await.unwrap();
    assert_eq!((r.saved, r.error.as_str()), (4, ""));
    // return_event on a CPU backend: the copy is done when the reply comes, so no event.
    let target = Engine::zeroed();
    let reply = c.register_kv_cache(target.registration(ns.handle)).await.unwrap();
    let r = c.load_kv(pb::LoadKv { return_event: true, ..load(reply.cache, &hashes, &[9, 8, 7, 6]) }).await.unwrap();
    assert_eq!((r.loaded, r.error.as_str(), r.done_event.len()), (4, "", 0));
    assert!(target.block(9) == engine.block(1), "the block is in place when the reply comes");
    // An engine event on the CPU backend: refused in the reply, nothing copied, nothing pinned.
    let r = c.load_kv(pb::LoadKv { wait_event: vec![1u8; 64].into(), ..load(reply.cache, &hashes[..1], &[9]) }).await;
    let r = r.unwrap();
    assert!(r.loaded == 0 && r.error.contains("does not take engine events"), "{r:?}");
    assert!(c.stats().await.is_ok(), "soft errors keep the connection");
}
