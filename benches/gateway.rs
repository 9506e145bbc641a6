//! The inference gateway: requests of a multi-turn trace replayed at a fixed rate through
//! `kvtier gateway` to real vLLM OpenAI servers (CPU build, each with the kvtier connector and
//! its own kvtierd; 4 by default, `KVTIER_BENCH_ENGINES`), against round-robin over the same
//! servers in the same run (fresh servers and daemons for each arm): TTFT p50/p95, prompt tokens
//! served from cache, requests per engine. Goal: p50 TTFT at least 3x lower than round-robin.
//!
//! Then the gateway's own cost: the time one decision adds (p50/p99, index lookups and scoring,
//! prompt given as token ids), tokenization per 1,000 tokens (chat template included), and the
//! extra hop the proxy adds (`GET /v1/models` through the gateway against directly).
//!
//! The trace is `../shared/data/traces/synthetic_trace.jsonl` (Mooncake's, 512-token blocks
//! as hash ids): each hash id becomes TOKENS_PER_ID tokens drawn from a generator seeded by the
//! id, so equal ids are equal prefixes; prompts are cut to MAX_IDS ids. The replay takes the
//! trace's first CONVERSATIONS conversations of at least 3 turns (the turns of a conversation
//! share their first block), every turn in trace order: the trace's first requests alone are
//! mostly first turns of conversations whose later turns come much later (4 % of their blocks
//! are reusable, against 78 % here).
//!
//! `cargo build --release --bins && cargo bench -p kvtier-benches --bench gateway`
//! (vLLM venv from `scripts/vllm-venv`, or `KVTIER_VLLM_PYTHON`; `KVTIER_BENCH_CONVERSATIONS`
//! (default 10) and `KVTIER_BENCH_QPS` (default 0.4) size the replay; `KVTIER_TRACE` picks
//! another trace; `KVTIER_BENCH_ENGINES` (default 4) the servers; `KVTIER_BENCH_MAX_IDS` (default
//! 96) where prompts are cut)

use kvtier_core::block_key::request_keys;
use kvtier_gateway::decide::{Gateway, Tokenizers};
use kvtier_gateway::engines::Engines;
use kvtier_gateway::openai::Api;
use kvtier_gateway::tokenize::ModelTokenizer;
use kvtier_proto::v1 as pb;
use kvtier_router::feed::Shared;
use kvtier_router::score::Weights;
use kvtier_tests::{
    free_local_addr, http_get, make_model, output_with_input, repo, result_line, vllm_python, Daemon, KvtierProc,
    VllmServer,
};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOKENS_PER_ID: usize = 32;
/// Hash ids a prompt is cut at by default (`KVTIER_BENCH_MAX_IDS`).
const MAX_IDS: usize = 96;
const VOCAB: u32 = 1024;
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn id_tokens(id: u64) -> Vec<u32> {
    let mut x = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..TOKENS_PER_ID)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            3 + (x % u64::from(VOCAB - 3)) as u32
        })
        .collect()
}

/// The replayed requests: arrival (s), prompt token ids, tokens to generate.
fn requests(conversations: usize, qps: f64, max_ids: usize) -> Vec<Value> {
    let trace = std::env::var("KVTIER_TRACE")
        .unwrap_or_else(|_| repo().join("../shared/data/traces/synthetic_trace.jsonl").display().to_string());
    let text = std::fs::read_to_string(&trace).unwrap_or_else(|e| panic!("{trace}: {e}"));
    let all: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let first = |r: &Value| r["hash_ids"][0].as_u64();
    let mut turns: std::collections::HashMap<Option<u64>, usize> = std::collections::HashMap::new();
    all.iter().for_each(|r| *turns.entry(first(r)).or_default() += 1);
    let mut chosen: Vec<Option<u64>> = Vec::new();
    for r in &all {
        if chosen.len() < conversations && turns[&first(r)] >= 3 && !chosen.contains(&first(r)) {
            chosen.push(first(r));
        }
    }
    let mut seen = std::collections::HashSet::new();
    all.iter()
        .filter(|r| chosen.contains(&first(r)))
        .enumerate()
        .map(|(i, r)| {
            // A later turn: its conversation has been seen, so some prefix of it can be cached.
            let later = !seen.insert(first(r));
            let ids: Vec<u64> =
                r["hash_ids"].as_array().unwrap().iter().take(max_ids).map(|v| v.as_u64().unwrap()).collect();
            let prompt: Vec<u32> = ids.iter().flat_map(|&id| id_tokens(id)).collect();
            let out = r["output_length"].as_u64().unwrap_or(8).clamp(1, 8);
            json!({"at": i as f64 / qps, "prompt": prompt, "max_tokens": out, "later": later})
        })
        .collect()
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

struct Arm {
    ttft: Vec<f64>,
    /// TTFT of the later turns of conversations (the requests routing can help).
    later: Vec<f64>,
    hit: f64,
    per_engine: Vec<usize>,
    errors: usize,
    /// The gateway's decisions by reason and the blocks it routed to (gateway arm only).
    decisions: String,
}

/// `engines` fresh nodes (a daemon and a server each); the replay sent to the gateway in front
/// of them, or round-robin to the servers themselves.
fn arm(py: &Path, model: &Path, reqs: &Path, engines: usize, max_ids: usize, gateway: bool) -> Arm {
    let sent: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(reqs).unwrap()).unwrap();
    // Blocks of this model are 8 MiB (8 layers, K and V, 8 heads of 128, fp32, 128 tokens): the
    // slab must hold them.
    let node = || Daemon::start(&["--pool-bytes", "1536 MiB", "--slab-bytes", "32 MiB"]);
    let daemons: Vec<Daemon> = (0..engines).map(|_| node()).collect();
    let len = (max_ids * TOKENS_PER_ID + 512).max(2048).to_string();
    let mut servers: Vec<VllmServer> =
        daemons.iter().map(|d| VllmServer::start(py, model, d, &["--max-model-len", &len])).collect();
    servers.iter_mut().for_each(VllmServer::wait_ready);
    let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
    let gw_addr = free_local_addr();
    let model_flag = format!("tiny={}", model.display());
    let gw = gateway.then(|| {
        let mut args = vec!["gateway", "--listen", &gw_addr, "--model", &model_flag];
        daemons.iter().for_each(|d| args.extend(["--daemon", d.grpc.as_str()]));
        addrs.iter().for_each(|a| args.extend(["--engine", a.as_str()]));
        KvtierProc::start(&args, &gw_addr)
    });
    let targets: Vec<&str> = if gateway { vec![gw_addr.as_str()] } else { addrs.iter().map(String::as_str).collect() };
    let out = Command::new(py).arg(repo().join("benches/gateway_load.py")).arg(reqs).args(&targets).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let results = result_line(&stdout)
        .unwrap_or_else(|| panic!("gateway_load.py: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    let results = results.as_array().unwrap();
    let ok: Vec<&Value> = results.iter().filter(|r| r["error"].is_null() && r["ttft"].is_f64()).collect();
    let (cached, prompt) = ok.iter().fold((0.0, 0.0), |(c, p), r| {
        (c + r["cached_tokens"].as_f64().unwrap_or(0.0), p + r["prompt_tokens"].as_f64().unwrap_or(0.0))
    });
    let decisions = gw.as_ref().map_or_else(String::new, |_| {
        let text = http_get(&gw_addr, "/metrics").unwrap_or_default();
        let pick = |prefix: &str| {
            text.lines()
                .filter(|l| l.starts_with(prefix))
                .map(|l| l.trim_start_matches(prefix))
                .collect::<Vec<_>>()
                .join(" ")
        };
        format!(
            "decisions {}; routed blocks {}",
            pick("kvtier_gateway_decisions_total"),
            pick("kvtier_gateway_matched_blocks_total")
        )
    });
    if std::env::var_os("KVTIER_BENCH_LOG").is_some() {
        if let Some(g) = &gw {
            eprintln!("{}", g.log());
        }
    }
    let later = results
        .iter()
        .zip(&sent)
        .filter(|(r, s)| s["later"].as_bool() == Some(true) && r["error"].is_null())
        .filter_map(|(r, _)| r["ttft"].as_f64())
        .collect();
    Arm {
        decisions,
        later,
        ttft: ok.iter().map(|r| r["ttft"].as_f64().unwrap()).collect(),
        hit: cached / prompt.max(1.0),
        per_engine: addrs.iter().map(|a| ok.iter().filter(|r| r["endpoint"].as_str() == Some(a)).count()).collect(),
        errors: results.len() - ok.len(),
    }
}

/// The proxy's extra hop: `GET /v1/models` p50/p99 through the gateway and directly.
fn hop_cost(py: &Path, model: &Path) -> ((f64, f64), (f64, f64)) {
    let d = Daemon::start(&[]);
    let mut s = VllmServer::start(py, model, &d, &[]);
    s.wait_ready();
    let gw = free_local_addr();
    let _g = KvtierProc::start(&["gateway", "--listen", &gw, "--daemon", &d.grpc, "--engine", &s.addr], &gw);
    let time = |addr: &str| {
        let mut v: Vec<f64> = (0..300)
            .map(|_| {
                let t = Instant::now();
                http_get(addr, "/v1/models").expect("models");
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        v.drain(..50); // warm-up
        (percentile(&v, 0.5), percentile(&v, 0.99))
    };
    (time(&gw), time(&s.addr))
}

/// Microseconds per 1,000 tokens of HF's own fast tokenizer (Python `tokenizers`, what vLLM
/// runs) encoding `text` with the same tokenizer.json: the reference for ours.
fn hf_tokenize_us_per_1000(py: &Path, model: &Path, text: &str) -> f64 {
    let script = "import sys, time\nfrom tokenizers import Tokenizer\nt = Tokenizer.from_file(sys.argv[1])\ntext = sys.stdin.read()\nn = len(t.encode(text, add_special_tokens=False).ids)\nstart = time.perf_counter()\nfor _ in range(200):\n    t.encode(text, add_special_tokens=False)\nprint((time.perf_counter() - start) / 200 * 1e6 * 1000 / n)\n";
    let mut python = Command::new(py);
    python.args(["-c", script, model.join("tokenizer.json").to_str().unwrap()]);
    let out = output_with_input(&mut python, text.as_bytes());
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("the reference's timing")
}

/// One decision's cost with a followed daemon holding `prompts` prompts of `blocks` blocks.
fn decision_cost(py: &Path, model: &Path) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let d = Daemon::start(&["--pool-bytes", "1 GiB"]);
    let (prompts, blocks) = (256usize, 64usize);
    let all: Vec<Vec<u32>> =
        (0..prompts as u64).map(|p| (0..blocks as u64).flat_map(|b| id_tokens(p << 20 | b)).collect()).collect();
    let info = pb::EngineInfo { address: "127.0.0.1:1".into(), served_models: vec!["tiny".into()] };
    let _engine = rt.block_on(async {
        let mut c = kvtier_client::Client::connect_as(&d.socket, "bench", Some(info)).await.unwrap();
        let desc = kvtier_client::NamespaceDescriptor { tokens_per_block: 16, ..kvtier_tests::namespace("tiny", 4096) };
        let ns = c.register(desc).await.unwrap();
        for tokens in &all {
            let keys: Vec<bytes::Bytes> =
                request_keys(tokens, 16, "").iter().map(|k| bytes::Bytes::copy_from_slice(k.as_bytes())).collect();
            let data = kvtier_tests::blocks_for(&keys, 4096);
            c.save(&ns, &keys, &kvtier_tests::refs(&data)).await.unwrap();
        }
        c
    });
    let feed = rt.block_on(async {
        let feed = Shared::new(1 << 24, Duration::from_secs(30));
        feed.add(&d.grpc);
        feed
    });
    let want = prompts * all[0].len() / 16;
    let started = Instant::now();
    while feed.index().len() < want || feed.nodes()[0].engines.is_empty() {
        assert!(started.elapsed() < Duration::from_secs(60), "feed has {} of {want} blocks", feed.index().len());
        std::thread::sleep(Duration::from_millis(50));
    }
    let engines = Arc::new(Engines::default());
    engines.add("127.0.0.1:1");
    engines.add("127.0.0.1:2");
    let tok = Arc::new(ModelTokenizer::load(model).unwrap());
    let mut t = Tokenizers::default();
    t.by_model.insert("tiny".into(), Arc::clone(&tok));
    let gateway = Gateway::new(Arc::clone(&feed), engines, t, Weights::default(), None);
    let bodies: Vec<Vec<u8>> =
        all.iter().map(|p| json!({"model": "tiny", "prompt": p, "max_tokens": 1}).to_string().into_bytes()).collect();
    let mut us: Vec<f64> = (0..20_000)
        .map(|i| {
            let t = Instant::now();
            let d = gateway.decide(Api::Completions, &bodies[i % prompts], None).unwrap();
            let e = t.elapsed();
            assert_eq!(d.host_blocks as usize, blocks * TOKENS_PER_ID / 16);
            e.as_secs_f64() * 1e6
        })
        .collect();
    us.drain(..1000);
    println!(
        "gateway decision ({} blocks indexed, {}-block prompts as token ids): p50 {:.1} us, p99 {:.1} us",
        want,
        blocks * TOKENS_PER_ID / 16,
        percentile(&us, 0.5),
        percentile(&us, 0.99)
    );
    let text = (0..400)
        .map(|i| format!("alpha{} beta{} gamma{} cache block", i % 13, i % 7, i % 5))
        .collect::<Vec<_>>()
        .join(" ");
    let chat =
        json!({"model": "tiny", "messages": [{"role": "system", "content": text}, {"role": "user", "content": "hi"}]});
    let request = kvtier_gateway::openai::parse(Api::Chat, chat.to_string().as_bytes()).unwrap();
    let prompt = request.prompt.unwrap();
    let n = tok.tokens(&prompt).unwrap().len();
    let t = Instant::now();
    let reps = 200;
    for _ in 0..reps {
        tok.tokens(&prompt).unwrap();
    }
    let per = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
    let plain = tok.encode(&text, false).unwrap().len();
    let t = Instant::now();
    for _ in 0..reps {
        tok.encode(&text, false).unwrap();
    }
    let ours = t.elapsed().as_secs_f64() * 1e6 / reps as f64 * 1000.0 / plain as f64;
    let hf = hf_tokenize_us_per_1000(py, model, &text);
    println!(
        "tokenization: chat request of {n} tokens (template + BPE) {per:.0} us; BPE alone {ours:.0} us per 1,000 tokens, HF tokenizers (Python, what vLLM runs) {hf:.0} us per 1,000 tokens (reference), ratio {:.2}x",
        hf / ours
    );
}

fn main() {
    let py = vllm_python();
    let work = tempfile::tempdir().unwrap();
    let model = work.path().join("model");
    make_model(&py, &model, &["--layers", "8", "--hidden", "1024", "--heads", "16", "--kv-heads", "8"]);
    std::fs::write(model.join("chat_template.jinja"), CHATML).unwrap();
    decision_cost(&py, &model);

    let (conversations, qps) = (env_or("KVTIER_BENCH_CONVERSATIONS", 10usize), env_or("KVTIER_BENCH_QPS", 0.4f64));
    let engines = env_or("KVTIER_BENCH_ENGINES", 4usize);
    let max_ids = env_or("KVTIER_BENCH_MAX_IDS", MAX_IDS);
    let reqs = requests(conversations, qps, max_ids);
    let n = reqs.len();
    let file = work.path().join("requests.json");
    std::fs::write(&file, serde_json::to_string(&reqs).unwrap()).unwrap();
    let tokens: usize = reqs.iter().map(|r| r["prompt"].as_array().unwrap().len()).sum();
    println!(
        "replay: {n} requests ({conversations} conversations) of the trace at {qps} req/s, {TOKENS_PER_ID} tokens per hash id (cut at {max_ids} ids), {} prompt tokens on average; {engines} vLLM CPU servers (random Llama 8x1024), one kvtierd each",
        tokens / n
    );
    let rr = arm(&py, &model, &file, engines, max_ids, false);
    let gw = arm(&py, &model, &file, engines, max_ids, true);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    for (name, a) in [("round-robin (reference)", &rr), ("kvtier gateway", &gw)] {
        println!(
            "  {name:<26} TTFT p50 {:>7.3} s  p95 {:>7.3} s  mean {:>7.3} s   later turns ({}) p50 {:>7.3} s  mean {:>7.3} s   cached {:>5.1} % of prompt tokens   requests per engine {:?}   errors {}",
            percentile(&a.ttft, 0.5),
            percentile(&a.ttft, 0.95),
            mean(&a.ttft),
            a.later.len(),
            percentile(&a.later, 0.5),
            mean(&a.later),
            a.hit * 100.0,
            a.per_engine,
            a.errors
        );
        if !a.decisions.is_empty() {
            println!("    {}", a.decisions);
        }
    }
    println!(
        "  TTFT ratio (round-robin / gateway): p50 {:.2}x  p95 {:.2}x  mean {:.2}x;  later turns p50 {:.2}x  mean {:.2}x",
        percentile(&rr.ttft, 0.5) / percentile(&gw.ttft, 0.5),
        percentile(&rr.ttft, 0.95) / percentile(&gw.ttft, 0.95),
        mean(&rr.ttft) / mean(&gw.ttft),
        percentile(&rr.later, 0.5) / percentile(&gw.later, 0.5),
        mean(&rr.later) / mean(&gw.later)
    );
    let ((g50, g99), (d50, d99)) = hop_cost(&py, &model);
    println!(
        "proxy hop, GET /v1/models: through the gateway p50 {g50:.2} ms p99 {g99:.2} ms; directly p50 {d50:.2} ms p99 {d99:.2} ms; added p50 {:.2} ms",
        g50 - d50
    );
}
