//! Time to first token of a repeated long shared prefix on the real vLLM (CPU build): with kvtier,
//! against recomputing it, and against vLLM's own prefix cache, in the same run. Goal: >= 5x lower
//! than recompute. A random-weight Llama (8 layers, hidden 1024) makes prefill cost real time.
//! kvtier runs twice: the connector copying through the pool, and the daemon copying vLLM's KV
//! tensors itself (`--device-backend cma`).
//! Last, prefill/decode: a prefill instance saves through daemon A, and a decode instance on
//! daemon B has each prompt pulled from A over UCX (tcp) and loads it; its TTFT against recompute.
//! These prompts do not share a prefix, so every decode request pulls its whole prompt.
//!
//! `cargo build --release --bins && cargo bench -p kvtier-benches --bench vllm_ttft`
//! (vLLM venv from `scripts/vllm-venv`, or `KVTIER_VLLM_PYTHON`)

use kvtier_tests::{make_model, result_line, run_to_end, run_vllm, vllm_python, Daemon, TRANSFER_OVER_TCP};
use std::path::Path;

const PREFIX_TOKENS: usize = 4096;
const RUNS: usize = 3;

/// TTFT (seconds) of each prompt, served one after the other by one vLLM process.
fn ttft(py: &Path, model: &Path, prompts: &Path, extra: &[&str]) -> Vec<f64> {
    let base = [model.to_str().unwrap(), prompts.to_str().unwrap(), "--max-tokens", "1", "--pause", "1"];
    let mut cmd = run_vllm(py, &base);
    cmd.args(["--max-model-len", "8192", "--kv-cache-gib", "2"]).args(extra);
    let (_, stdout, stderr) = run_to_end(cmd, model.parent().unwrap());
    let v = result_line(&stdout)
        .unwrap_or_else(|| panic!("vLLM failed: {}", stderr.lines().rev().take(30).collect::<Vec<_>>().join("\n")));
    v["ttft"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let py = vllm_python();
    let work = tempfile::tempdir().unwrap();
    let model = work.path().join("model");
    make_model(&py, &model, &["--layers", "8", "--hidden", "1024", "--heads", "16", "--kv-heads", "8"]);
    let mut x = 7u64;
    let mut next = || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        3 + (x >> 33) as u32 % 1000
    };
    let mut tokens = |n| (0..n).map(|_| next()).collect::<Vec<u32>>();
    // One long prompt, then RUNS prompts sharing its prefix with different tails.
    let prefix = tokens(PREFIX_TOKENS);
    let shared: Vec<Vec<u32>> = (0..=RUNS).map(|_| [prefix.clone(), tokens(8)].concat()).collect();
    // P/D: every prompt its own, so that every decode request pulls its whole prefix.
    let distinct: Vec<Vec<u32>> = (0..=RUNS).map(|_| tokens(PREFIX_TOKENS + 8)).collect();
    let write = |name: &str, prompts: &[Vec<u32>]| {
        let file = work.path().join(name);
        std::fs::write(&file, serde_json::to_string(prompts).unwrap()).unwrap();
        file
    };
    let (file, pd_file) = (write("prompts.json", &shared), write("pd-prompts.json", &distinct));

    let d = Daemon::start(&["--pool-bytes", "2 GiB", "--slab-bytes", "64 MiB", "--device-backend", "host"]);
    let with_kvtier = ttft(&py, &model, &file, &["--socket", d.socket.to_str().unwrap()]);
    let cma = Daemon::start(&["--pool-bytes", "2 GiB", "--slab-bytes", "64 MiB", "--device-backend", "cma"]);
    let with_cma = ttft(&py, &model, &file, &["--socket", cma.socket.to_str().unwrap()]);
    drop(cma);
    let recompute = ttft(&py, &model, &file, &[]);
    let prefix_cache = ttft(&py, &model, &file, &["--prefix-caching"]);
    let (k, r, p) =
        (median(with_kvtier[1..].to_vec()), median(recompute[1..].to_vec()), median(prefix_cache[1..].to_vec()));
    println!(
        "vLLM CPU, random Llama 8x1024, {PREFIX_TOKENS}-token shared prefix + 8 new tokens, median of {RUNS} repeats"
    );
    println!("  {:<44} {:>9.3} s", "first request (prefix computed, kvtier run)", with_kvtier[0]);
    println!("  {:<44} {:>9.3} s", "repeat, recompute (no cache, reference)", r);
    println!(
        "  {:<44} {:>9.3} s   {:>6.1}x faster than recompute",
        "repeat, kvtier, the connector copies (host)",
        k,
        r / k
    );
    let c = median(with_cma[1..].to_vec());
    println!(
        "  {:<44} {:>9.3} s   {:>6.1}x faster than recompute",
        "repeat, kvtier, the daemon copies (cma)",
        c,
        r / c
    );
    println!("  {:<44} {:>9.3} s   {:>6.1}x faster than recompute", "repeat, vLLM's own prefix cache", p, r / p);
    println!(
        "  kvtier (default backend, the daemon copies) / vLLM prefix cache: {:.2}x the time; goal >= 5x faster \
         than recompute: {}",
        c / p,
        if r / c.max(k) >= 5.0 { "met" } else { "NOT met" }
    );

    let peer = [&["--pool-bytes", "2 GiB", "--slab-bytes", "64 MiB"][..], TRANSFER_OVER_TCP].concat();
    let (a, b) = (Daemon::start(&peer), Daemon::start_with_metrics(&peer, true));
    let params = work.path().join("params.json");
    let (a_sock, b_sock, params) = (a.socket.to_str().unwrap(), b.socket.to_str().unwrap(), params.to_str().unwrap());
    ttft(&py, &model, &pd_file, &["--socket", a_sock, "--transfer-source", &a.grpc, "--emit-params", params]);
    // Warmed up, so that its first timed request pays for what P/D adds (the daemons' first
    // pull, which connects their UCX lanes), not for vLLM's own first call.
    let decode = ttft(&py, &model, &pd_file, &["--socket", b_sock, "--params", params, "--warm-up"]);
    let d = median(decode[1..].to_vec());
    println!(
        "  {:<44} {:>9.3} s   {:>6.1}x faster than recompute",
        "P/D: decode pulls the prompt, then loads it",
        d,
        r / d
    );
    println!("  {:<44} {:>9.3} s", "P/D: first decode request (UCX connects)", decode[0]);
    println!(
        "    (the decode daemon pulled {} blocks, {:.0} MiB, over {} requests: each its whole prefix)",
        b.metric("kvtier_peer_pulled_blocks_total"),
        b.metric("kvtier_peer_pulled_bytes_total") / (1 << 20) as f64,
        decode.len()
    );
    println!("    (the decode vLLM ran one short untimed prompt first, so its first call's costs are not in it)");
}
