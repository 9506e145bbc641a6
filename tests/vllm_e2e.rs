//! End to end with the real vLLM (CPU build) and a tiny random-weight model built by the test:
//! a second vLLM process loads its shared prefix from kvtierd and generates exactly the tokens of
//! a run without kvtier; a killed daemon costs nothing but the cache; a restarted one is found
//! again; the daemon copying vLLM's KV tensors itself (backend "cma") gives the same tokens; a
//! prefix kept only on disk across a daemon restart is promoted and loaded exactly; a
//! decode instance gets its prompt shipped from a prefill instance's daemon over UCX; for
//! Llama, Gemma 3 (sliding window) and DeepSeek-V2 (MLA) layouts in bf16, outputs and
//! logprobs with prefixes loaded from kvtier equal vLLM's own prefix cache bit for bit, also
//! through the OpenAI server. The vLLM venv comes from `scripts/vllm-venv` (cached outside the repo), or
//! `KVTIER_VLLM_PYTHON`.

use kvtier_tests::{
    kill_group, make_model, result_line, run_to_end, run_vllm, vllm_python, Daemon, VllmServer, TRANSFER_OVER_TCP,
};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Stdio};

/// vLLM's CPU block size, in tokens.
const BLOCK: usize = 128;
/// Tokens every prompt shares: 7 full blocks plus a partial one.
const SHARED: usize = 7 * BLOCK + 40;

/// The vLLM tests of this file run one at a time (two engines on 2 cores slow both to a crawl).
static ONE_VLLM: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs vLLM over all prompts in one process; returns (outputs, cached tokens) per prompt.
fn run_batch(py: &Path, model: &Path, prompts: &Path, socket: Option<&Path>) -> (Vec<Value>, Vec<u64>) {
    run_batch_with(py, model, prompts, socket, &[])
}

fn run_batch_with(
    py: &Path,
    model: &Path,
    prompts: &Path,
    socket: Option<&Path>,
    extra: &[&str],
) -> (Vec<Value>, Vec<u64>) {
    let r = run_batch_result(py, model, prompts, socket, extra);
    (r["outputs"].as_array().unwrap().clone(), cached_tokens(&r))
}

fn cached_tokens(r: &Value) -> Vec<u64> {
    r["cached_tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
}

/// Runs vLLM over all prompts in one process; its RESULT.
fn run_batch_result(py: &Path, model: &Path, prompts: &Path, socket: Option<&Path>, extra: &[&str]) -> Value {
    let mut args = vec![model.to_str().unwrap(), prompts.to_str().unwrap()];
    if let Some(s) = socket {
        args.extend(["--socket", s.to_str().unwrap()]);
    }
    args.extend(extra);
    let logs = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = run_to_end(run_vllm(py, &args), logs.path());
    let tail: String =
        stderr.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    assert!(ok, "vLLM failed:\n{tail}");
    assert!(!stderr.contains("Traceback"), "vLLM printed a traceback:\n{tail}");
    result_line(&stdout).unwrap_or_else(|| panic!("no RESULT line:\n{stdout}\n{tail}"))
}

/// A vLLM process that serves one prompt per request, so the test can act in between.
struct Interactive {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Interactive {
    fn start(py: &Path, model: &Path, prompts: &Path, socket: &Path) -> Self {
        let mut child = run_vllm(
            py,
            &[
                model.to_str().unwrap(),
                prompts.to_str().unwrap(),
                "--socket",
                socket.to_str().unwrap(),
                "--interactive",
            ],
        )
        // vLLM's ZeroMQ sockets beside the daemon's, removed with it.
        .env("VLLM_RPC_BASE_PATH", socket.parent().unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while line.trim() != "READY" {
            line.clear();
            assert!(stdout.read_line(&mut line).unwrap() > 0, "vLLM exited before READY");
        }
        Self { child, stdin, stdout }
    }

    /// Serves prompt `i`; returns (output, cached tokens).
    fn ask(&mut self, i: usize) -> (Value, u64) {
        let stdin = self.stdin.as_mut().expect("open stdin");
        writeln!(stdin, "{i}").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            assert!(self.stdout.read_line(&mut line).unwrap() > 0, "vLLM exited");
            if let Some(r) = result_line(&line) {
                return (r["output"].clone(), r["cached_tokens"].as_u64().unwrap());
            }
        }
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        // Closing stdin ends run_vllm.py, which shuts vLLM down with its engine processes; if
        // that does not happen in time, the whole process group goes (vLLM's engine and worker
        // processes would otherwise outlive the test, holding its output pipes).
        drop(self.stdin.take());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        kill_group(&self.child);
        let _ = self.child.wait();
    }
}

fn prompts() -> Vec<Vec<u32>> {
    let mut x = 12345u64;
    let mut next = || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        3 + (x >> 33) as u32 % 1000
    };
    let shared: Vec<u32> = (0..SHARED).map(|_| next()).collect();
    (0..4).map(|i| shared.iter().copied().chain((0..3 + i).map(|_| next())).collect()).collect()
}

fn daemon_stats(d: &Daemon) -> Value {
    serde_json::from_slice(&d.kvtier(&["status", "--json"]).stdout).unwrap()
}

/// What every test here starts from: the turn to run vLLM, the tiny model and a prompts file.
struct Setup {
    _one: std::sync::MutexGuard<'static, ()>,
    py: std::path::PathBuf,
    work: tempfile::TempDir,
    model: std::path::PathBuf,
    prompts_file: std::path::PathBuf,
}

fn setup(prompts: &[Vec<u32>], model_args: &[&str]) -> Setup {
    let one = ONE_VLLM.lock().unwrap_or_else(|e| e.into_inner());
    let py = vllm_python();
    let work = tempfile::tempdir().unwrap();
    let model = work.path().join("model");
    make_model(&py, &model, model_args);
    let prompts_file = work.path().join("prompts.json");
    std::fs::write(&prompts_file, serde_json::to_string(prompts).unwrap()).unwrap();
    Setup { _one: one, py, work, model, prompts_file }
}

#[test]
fn vllm_loads_shared_prefixes_from_kvtier() {
    let Setup { _one, py, work, model, prompts_file } = setup(&prompts(), &[]);
    let held_tokens = (SHARED / BLOCK * BLOCK) as u64;

    // The reference: vLLM without kvtier.
    let (reference, cached) = run_batch(&py, &model, &prompts_file, None);
    assert_eq!(cached, vec![0; 4]);

    // Two vLLM processes one after the other: the second loads the shared prefix from kvtierd.
    // Backend "host": the connector copies through its pool mapping (the default, "auto", has the
    // daemon copy instead: the phases from the disk tier on, and the "cma" phase below).
    let mut d = Daemon::start(&["--pool-bytes", "256 MiB", "--slab-bytes", "4 MiB", "--device-backend", "host"]);
    let one = work.path().join("one.json");
    std::fs::write(&one, serde_json::to_string(&prompts()[..1]).unwrap()).unwrap();
    let (out, cached) = run_batch(&py, &model, &one, Some(&d.socket));
    assert_eq!((out[0].clone(), cached[0]), (reference[0].clone(), 0), "first run, nothing to load");
    let stats = daemon_stats(&d);
    assert_eq!(stats["tiers"][0]["blocks"].as_u64(), Some(held_tokens / BLOCK as u64), "prompt blocks saved: {stats}");
    let stats_file = work.path().join("connector-stats");
    let stats_arg = stats_file.to_str().unwrap();
    let (out, cached) = run_batch_with(&py, &model, &prompts_file, Some(&d.socket), &["--stats-file", stats_arg]);
    assert_eq!(cached[1], held_tokens, "second process got its shared prefix from kvtier");
    assert!(cached.iter().all(|&c| c == held_tokens), "vLLM reports the external hits: {cached:?}");
    let connector = |role: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(format!("{stats_arg}.{role}")).unwrap()).unwrap()
    };
    let (worker, scheduler) = (connector("worker"), connector("scheduler"));
    assert_eq!(worker["loaded_tokens"].as_u64(), Some(4 * held_tokens), "connector's loaded tokens: {worker}");
    assert_eq!(worker["load_errors"].as_u64(), Some(0), "{worker}");
    assert_eq!(scheduler["matched_tokens"].as_u64(), Some(4 * held_tokens), "{scheduler}");
    assert_eq!(out, reference, "greedy tokens equal those of a run without kvtier");
    let stats = daemon_stats(&d);
    let loaded_blocks = stats["counters"]["kvtier_loaded_bytes_total"].as_u64().unwrap()
        / (stats["counters"]["kvtier_saved_bytes_total"].as_u64().unwrap()
            / stats["tiers"][0]["blocks"].as_u64().unwrap());
    assert!(loaded_blocks >= 4 * held_tokens / BLOCK as u64, "each of 4 prompts loaded the prefix: {stats}");

    // Daemon-side copies (backend "cma"): the connector registers vLLM's KV tensors once and the
    // daemon copies every layer of every block itself, with the same outputs. The first run saves
    // in pieces of one block each (one SaveKv per block, each naming its parent).
    let cma = ["--pool-bytes", "256 MiB", "--slab-bytes", "4 MiB", "--device-backend", "cma"];
    let dma = Daemon::start_with_metrics(&cma, true);
    let (out, _) = run_batch_with(&py, &model, &one, Some(&dma.socket), &["--save-piece-bytes", "1"]);
    assert_eq!(out[0], reference[0]);
    let save_requests = dma.metric("kvtier_request_duration_seconds_count{op=\"save_kv\"}");
    assert_eq!(save_requests, (held_tokens / BLOCK as u64) as f64, "one SaveKv per block");
    assert_eq!(daemon_stats(&dma)["tiers"][0]["blocks"].as_u64(), Some(held_tokens / BLOCK as u64));
    let dma_stats = work.path().join("dma-stats");
    let dma_arg = dma_stats.to_str().unwrap();
    let (out, cached) = run_batch_with(&py, &model, &prompts_file, Some(&dma.socket), &["--stats-file", dma_arg]);
    assert_eq!(out, reference, "outputs with the daemon copying the KV blocks");
    assert!(cached.iter().all(|&c| c == held_tokens), "every prompt loaded the prefix: {cached:?}");
    let worker: Value = serde_json::from_str(&std::fs::read_to_string(format!("{dma_arg}.worker")).unwrap()).unwrap();
    assert_eq!(worker["daemon_copy_errors"].as_u64(), Some(0), "{worker}");
    assert_eq!(worker["loaded_tokens"].as_u64(), Some(4 * held_tokens), "{worker}");
    assert!(worker["daemon_copied_blocks"].as_u64() >= Some(4 * held_tokens / BLOCK as u64), "{worker}");
    let prompt_bytes = dma.metric("kvtier_device_saved_bytes_total");
    assert!(prompt_bytes > 0.0, "the first run's prompt was saved by the daemon");
    assert!(dma.metric("kvtier_device_loaded_bytes_total") >= 4.0 * prompt_bytes, "loaded by the daemon");
    drop(dma);

    // Daemon frozen (SIGSTOP: connections are accepted by the kernel, nothing is answered): the
    // same outputs, nothing cached, and the connector gives up on it after a short timeout,
    // then leaves it alone (30 s) instead of waiting on every request.
    let pid = nix::unistd::Pid::from_raw(d.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::SIGSTOP).unwrap();
    let frozen_stats = work.path().join("frozen-stats");
    let frozen_arg = frozen_stats.to_str().unwrap();
    let frozen = run_batch_with(&py, &model, &prompts_file, Some(&d.socket), &["--stats-file", frozen_arg]);
    nix::sys::signal::kill(pid, nix::sys::signal::SIGCONT).unwrap();
    assert_eq!(frozen, (reference.clone(), vec![0; 4]), "outputs with the daemon frozen, nothing loaded");
    let scheduler: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{frozen_arg}.scheduler")).unwrap()).unwrap();
    assert!(scheduler["daemon_timeouts"].as_u64() >= Some(1), "the scheduler timed out on it: {scheduler}");

    // Daemon SIGKILLed: the same outputs, no error, nothing cached.
    d.kill();
    assert!(!d.socket.exists() || std::os::unix::net::UnixStream::connect(&d.socket).is_err());
    let (out, cached) = run_batch(&py, &model, &prompts_file, Some(&d.socket));
    assert_eq!(out, reference, "outputs with the daemon gone");
    assert_eq!(cached, vec![0; 4]);

    // Daemon restarted while vLLM runs: the connector reconnects and hits again.
    d.restart();
    let mut e = Interactive::start(&py, &model, &prompts_file, &d.socket);
    assert_eq!(e.ask(0), (reference[0].clone(), 0));
    assert_eq!(e.ask(1), (reference[1].clone(), held_tokens));
    d.restart();
    // The first requests after the restart find the old connection broken and miss; the
    // connector reconnects with backoff (0.1 s, doubling), saves again, and hits again.
    let mut hits_after_restart = 0;
    for i in [2, 3, 1, 2, 3, 1] {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let (out, cached) = e.ask(i);
        assert_eq!(out, reference[i], "prompt {i} after the restart");
        if cached == held_tokens {
            hits_after_restart += 1;
        }
    }
    assert!(hits_after_restart >= 2, "the connector found the restarted daemon again");
    assert!(daemon_stats(&d)["counters"]["kvtier_loaded_bytes_total"].as_u64().unwrap() > 0);
    drop(e);

    // With a disk tier: the prefix saved by one vLLM survives a daemon restart on disk only, is
    // promoted (prefetched by the scheduler, verified) and loaded by the next vLLM, exactly.
    // (Saved through the default backend, loaded through the connector's copy.)
    let spill = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap(); // O_DIRECT: not tmpfs
    let spill_arg = spill.path().to_str().unwrap();
    let disk =
        ["--pool-bytes", "256 MiB", "--slab-bytes", "4 MiB", "--disk-dir", spill_arg, "--disk-admission", "always"];
    d.restart_with(&disk);
    let (out, _) = run_batch(&py, &model, &one, Some(&d.socket));
    assert_eq!(out[0], reference[0]);
    kvtier_tests::eventually("the prompt's blocks written back", || {
        daemon_stats(&d)["tiers"][1]["blocks"].as_u64() >= Some(held_tokens / BLOCK as u64)
    });
    d.terminate();
    // Saved by the daemon copying out of vLLM (the default backend, cma), loaded by the
    // connector's own copy (host): both paths put the same bytes in a slot.
    let disk_host = [&disk[..], &["--device-backend", "host"]].concat();
    d.restart_with(&disk_host);
    let stats = daemon_stats(&d);
    assert_eq!(stats["tiers"][0]["blocks"].as_u64(), Some(0), "the pool starts empty: {stats}");
    let (out, cached) = run_batch(&py, &model, &prompts_file, Some(&d.socket));
    assert_eq!(out, reference, "outputs with the prefix promoted from disk");
    assert!(cached.iter().all(|&c| c == held_tokens), "every prompt loaded the prefix: {cached:?}");
    let stats = daemon_stats(&d);
    assert!(
        stats["counters"]["kvtier_disk_promoted_blocks_total"].as_u64() >= Some(held_tokens / BLOCK as u64),
        "{stats}"
    );
    assert!(stats["counters"]["kvtier_disk_hit_blocks_total"].as_u64() > Some(0), "{stats}");
    assert_eq!(stats["counters"]["kvtier_disk_corrupt_blocks_total"].as_u64(), Some(0), "{stats}");
    drop(d);

    // Prefill/decode: a prefill vLLM saves into its daemon and hands each request's
    // kv_transfer_params on; a decode vLLM on another daemon gets the prompt pulled over UCX
    // (TCP) by its daemon and loads it instead of recomputing, with the same outputs.
    let peer = [&["--pool-bytes", "256 MiB", "--slab-bytes", "4 MiB"][..], TRANSFER_OVER_TCP].concat();
    let (prefill, decode) = (Daemon::start(&peer), Daemon::start(&peer));
    let params = work.path().join("transfer-params.json");
    let params_arg = params.to_str().unwrap();
    let (_, _) = run_batch_with(
        &py,
        &model,
        &prompts_file,
        Some(&prefill.socket),
        &["--transfer-source", &prefill.grpc, "--emit-params", params_arg, "--max-tokens", "1"],
    );
    let emitted: Value = serde_json::from_str(&std::fs::read_to_string(&params).unwrap()).unwrap();
    assert_eq!(emitted[0]["kvtier_source"].as_str(), Some(prefill.grpc.as_str()), "{emitted}");
    let pd_stats = work.path().join("pd-stats");
    let pd_arg = pd_stats.to_str().unwrap();
    // One block per pull (`pull_piece_bytes` 1): every prompt arrives in many pieces, each
    // continuing the one before, and is loaded piece by piece while the next is pulled.
    let decode_args = ["--params", params_arg, "--stats-file", pd_arg, "--pull-piece-bytes", "1"];
    let (out, cached) = run_batch_with(&py, &model, &prompts_file, Some(&decode.socket), &decode_args);
    assert_eq!(out, reference, "decode outputs equal a single-instance run");
    assert!(cached.iter().all(|&c| c >= held_tokens), "the prompts were loaded, not recomputed: {cached:?}");
    // Pulled and loaded by the worker in the background (vLLM's asynchronous load), not in the
    // scheduler's lookup.
    let worker: Value = serde_json::from_str(&std::fs::read_to_string(format!("{pd_arg}.worker")).unwrap()).unwrap();
    assert_eq!(worker["pull_errors"].as_u64(), Some(0), "{worker}");
    assert!(worker["pulled_blocks"].as_u64() >= Some(held_tokens / BLOCK as u64), "{worker}");
    assert_eq!(worker["load_errors"].as_u64(), Some(0), "{worker}");
    let shipped = daemon_stats(&decode)["counters"]["kvtier_saved_bytes_total"].as_u64().unwrap();
    assert!(shipped > 0, "blocks arrived through the peer tier");

    // The prefill daemon gone: a fresh decode daemon's pulls fail, the parked request's blocks
    // are reported as load errors, and vLLM recomputes them: the same outputs.
    drop(prefill);
    let lonely = Daemon::start(&peer);
    let failed_stats = work.path().join("pd-failed-stats");
    let failed_arg = failed_stats.to_str().unwrap();
    let args = ["--params", params_arg, "--stats-file", failed_arg];
    let (out, cached) = run_batch_with(&py, &model, &prompts_file, Some(&lonely.socket), &args);
    assert_eq!(out, reference, "decode outputs with the prefill daemon gone");
    // The first prompt had nothing anywhere; the others then load the shared prefix the decode
    // instance saved itself after recomputing it.
    assert_eq!(cached[0], 0, "{cached:?}");
    let worker: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{failed_arg}.worker")).unwrap()).unwrap();
    assert!(worker["pull_errors"].as_u64() >= Some(1), "{worker}");
    assert!(worker["load_errors"].as_u64() >= Some(held_tokens / BLOCK as u64), "{worker}");
}

/// The engine core in process (every step batches exactly the requests added before it, so
/// two runs batch alike whatever the timing; docs/vllm.md, "Exactness"): prompts whose prefix
/// comes from kvtier give the tokens and logprobs of the same prompts whose prefix comes from
/// vLLM's own prefix cache, bit for bit, and a prompt with nothing to load gives those of an
/// engine without the connector. One model per KV layout: Llama in bf16 with blocks of 32,
/// Gemma 3 (sliding-window and full-attention layers) and DeepSeek-V2 (MLA) in bf16 with blocks
/// of 64; `scripts/vllm-matrix` runs every combination.
#[test]
fn loaded_prefixes_give_vllms_own_prefix_cache_outputs_bit_for_bit_per_layout() {
    for case in matrix("KVTIER_VLLM_MATRIX", "llama:bfloat16:32 gemma3:bfloat16:64 deepseek_v2:bfloat16:64") {
        exact(&case);
    }
}

/// The same promise through vLLM's OpenAI server (its engine core in its own process): two
/// servers, one with vLLM's prefix cache and no connector, one with the connector and a
/// kvtierd and no prefix cache, each sent the prompts one at a time (a step then batches one
/// request, whatever the timing). Gemma 3 in bf16 with blocks of 64 here;
/// `scripts/vllm-matrix --server` runs the others.
#[test]
fn through_the_openai_server_loaded_prefixes_give_the_prefix_cache_outputs() {
    for case in matrix("KVTIER_VLLM_SERVER_MATRIX", "gemma3:bfloat16:64") {
        exact_served(&case);
    }
}

fn exact_served(case: &Case) {
    let prompts: Vec<Vec<u32>> = prompts().into_iter().map(|p| p[BLOCK * 5..].to_vec()).collect();
    let Setup { _one, py, work: _work, model, prompts_file } = setup(&prompts, &["--arch", &case.arch]);
    let block = case.block.to_string();
    let mut flags = vec!["--dtype", &case.dtype, "--block-size", &block];
    if let Some(kv) = &case.kv_dtype {
        flags.extend(["--kv-cache-dtype", kv]);
    }
    let d = Daemon::start(&["--pool-bytes", "256 MiB", "--slab-bytes", "4 MiB", "--device-backend", "host"]);
    let own_flags = [&flags[..], &["--enable-prefix-caching"]].concat();
    let ours_flags = [&flags[..], &["--no-enable-prefix-caching"]].concat();
    let mut servers = [
        VllmServer::start_with(&py, &model, None, &own_flags),
        VllmServer::start_with(&py, &model, Some(&d), &ours_flags),
    ];
    servers.iter_mut().for_each(VllmServer::wait_ready);
    let ask = |s: &VllmServer| {
        let out = std::process::Command::new(&py)
            .arg(kvtier_tests::repo().join("tests/e2e/server_outputs.py"))
            .args([s.addr.as_str(), prompts_file.to_str().unwrap()])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        result_line(&stdout)
            .unwrap_or_else(|| panic!("server_outputs.py: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)))
    };
    let (own, ours) = (ask(&servers[0]), ask(&servers[1]));
    same_outputs(case, &prompts, &own, &ours, "texts", "OpenAI server");
}

/// One model, dtype, block size and KV cache dtype to check.
struct Case {
    arch: String,
    dtype: String,
    block: usize,
    /// vLLM's `kv_cache_dtype` (e.g. "fp8"), when not the model's dtype.
    kv_dtype: Option<String>,
}

impl Case {
    fn name(&self) -> String {
        let kv = self.kv_dtype.as_deref().unwrap_or("auto");
        format!("{} {} block {} kv {kv}", self.arch, self.dtype, self.block)
    }
}

/// The combinations to run: `default`, or what the environment variable `var` lists as
/// `ARCH:DTYPE:BLOCK[:KV_DTYPE]` separated by spaces (`scripts/vllm-matrix` sets it).
fn matrix(var: &str, default: &str) -> Vec<Case> {
    let listed = std::env::var(var).unwrap_or_else(|_| default.into());
    listed
        .split_whitespace()
        .map(|c| match c.split(':').collect::<Vec<_>>()[..] {
            [arch, dtype, block, ref kv @ ..] if kv.len() <= 1 => Case {
                arch: arch.into(),
                dtype: dtype.into(),
                block: block.parse().expect("block size"),
                kv_dtype: kv.first().map(|k| k.to_string()),
            },
            _ => panic!("KVTIER_VLLM_MATRIX: {c:?} is not ARCH:DTYPE:BLOCK[:KV_DTYPE]"),
        })
        .collect()
}

fn exact(case: &Case) {
    let Case { arch, dtype, block, kv_dtype } = case;
    let block = *block;
    let prompts: Vec<Vec<u32>> = prompts().into_iter().map(|p| p[BLOCK * 5..].to_vec()).collect();
    let Setup { _one, py, work: _work, model, prompts_file } = setup(&prompts, &["--arch", arch]);
    let block_flag = block.to_string();
    #[rustfmt::skip]
    let mut common = vec!["--dtype", dtype, "--block-size", &block_flag, "--logprobs", "--in-process", "--pause",
                          "1", "--max-tokens", "16"];
    if let Some(kv) = kv_dtype {
        common.extend(["--kv-cache-dtype", kv]);
    }
    let own = run_batch_result(&py, &model, &prompts_file, None, &[&common[..], &["--prefix-caching"]].concat());
    let d = Daemon::start(&["--pool-bytes", "256 MiB", "--slab-bytes", "4 MiB", "--device-backend", "host"]);
    let ours = run_batch_result(&py, &model, &prompts_file, Some(&d.socket), &common);
    same_outputs(case, &prompts, &own, &ours, "outputs", "offline");
}

/// Checks that the run with kvtier (`ours`) loaded what vLLM's prefix cache hit in `own`
/// (every prompt after the first: their shared full blocks) and gave the same `outputs` and
/// logprobs, bit for bit.
fn same_outputs(case: &Case, prompts: &[Vec<u32>], own: &Value, ours: &Value, outputs: &str, how: &str) {
    let shared = ((prompts[0].len().min(prompts[1].len()) - 1) / case.block * case.block) as u64;
    let name = format!("{} ({how})", case.name());
    assert_eq!(cached_tokens(own), [0, shared, shared, shared], "{name}: vLLM's prefix cache hits: {own}");
    assert_eq!(cached_tokens(ours), cached_tokens(own), "{name}: the connector loads what vLLM would hit: {ours}");
    assert_eq!(ours[outputs], own[outputs], "{name}: outputs");
    assert_eq!(ours["logprobs"], own["logprobs"], "{name}: logprobs, bit for bit");
    eprintln!("{name}: {shared} tokens loaded per prompt, outputs and logprobs bit-exact");
}
