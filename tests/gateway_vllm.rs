//! The inference gateway end to end: two real vLLM OpenAI servers (CPU build), each with the
//! kvtier connector and its own kvtierd (two nodes), `kvtier gateway` in front, and the official
//! `openai` client. Checks that the gateway's token ids equal vLLM's own (`/tokenize` and the
//! render endpoints) for many prompts and chat templates, that the keys it computes are the ones
//! the daemon holds after the engine served the request, that later turns of a conversation land
//! on the engine holding their prefix (reported cached tokens), that streams stream, that outputs
//! equal direct requests, that a LoRA adapter's conversation is keyed and routed the same way
//! (its keys carry the adapter as each engine loaded it), and that with that engine killed the
//! traffic moves on without a client error.

use kvtier_core::block_key::{adapter_request_keys, Extra};
use kvtier_core::namespace::NamespaceId;
use kvtier_gateway::openai::{parse, Api};
use kvtier_gateway::tokenize::ModelTokenizer;
use kvtier_proto::v1 as pb;
use kvtier_proto::v1::cache_service_client::CacheServiceClient;
use kvtier_router::feed::channel;
use kvtier_tests::{eventually, http_get, make_model, repo, result_line, vllm_python, Daemon, KvtierProc, VllmServer};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Chat templates in the shapes models ship: Llama 3's, Mistral's (alternation enforced with
/// raise_exception), a tools template using tojson, one iterating over content parts (vLLM's
/// "openai" content format), one reading chat_template_kwargs, one using Python string methods
/// and namespace().
const TEMPLATES: [&str; 6] = [
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}",
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}",
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools><|im_end|>\n{%- endif %}{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}",
    "{% for message in messages %}{{ message['role'] }}:{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}|{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}",
    "{% if enable_thinking is defined and not enable_thinking %}<no_think>{% endif %}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}",
    "{%- set ns = namespace(system='') -%}{%- for m in messages -%}{%- if m.role == 'system' -%}{%- set ns.system = m.content.strip() -%}{%- endif -%}{%- endfor -%}SYS={{ ns.system | upper }};{% for m in messages if m.role != 'system' %}{{ m.role.title() }}: {{ m.content.replace('alpha', 'A') }}{% if not loop.last %}\n{% endif %}{% endfor %}",
];

/// The RESULT of a script of tests/e2e, or what went wrong (its output and `context`).
fn python_result(py: &Path, script: &str, args: &[&str], context: &dyn Fn() -> String) -> Value {
    let out = Command::new(py).arg(repo().join("tests/e2e").join(script)).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let failed =
        |why: &str| panic!("{script} {why}:\n{stdout}\n{}\n{}", String::from_utf8_lossy(&out.stderr), context());
    if !out.status.success() {
        failed("failed");
    }
    result_line(&stdout).unwrap_or_else(|| failed("printed no RESULT"))
}

/// Requests whose token ids vLLM and the gateway must agree on: (endpoint, body, template the
/// request brings, if any).
fn cases() -> Vec<(&'static str, Value, Option<&'static str>)> {
    let long = (0..40).map(|i| format!("alpha{} beta{} naïve café ✓", i % 13, i % 7)).collect::<Vec<_>>().join(" ");
    let texts = ["alpha1 beta2 gamma", "  leading and trailing spaces  ", "<s> special </s> tokens as text", &long];
    let mut out = Vec::new();
    for t in texts {
        for add in [true, false] {
            let body = json!({"model": "tiny", "prompt": t, "add_special_tokens": add});
            out.push(("/tokenize", body.clone(), None));
            out.push(("/v1/completions/render", body, None));
        }
    }
    let conversations = [
        json!([{"role": "user", "content": "alpha1 beta2"}]),
        json!([{"role": "system", "content": " sys prompt "}, {"role": "user", "content": "hello"},
               {"role": "assistant", "content": "alpha beta"}, {"role": "user", "content": long}]),
        json!([{"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]}]),
        json!([{"role": "user", "content": "continue"}, {"role": "assistant", "content": "alpha beta gamma"}]),
    ];
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    for template in std::iter::once(None).chain(TEMPLATES.iter().map(|t| Some(*t))) {
        for (i, messages) in conversations.iter().enumerate() {
            let mut body = json!({"model": "tiny", "messages": messages});
            if i == 3 {
                body["add_generation_prompt"] = json!(false);
                body["continue_final_message"] = json!(true);
            }
            if i == 1 {
                body["tools"] = tools.clone();
                // The render endpoint refuses "auto" (the default) without a tool parser.
                body["tool_choice"] = json!("none");
                body["chat_template_kwargs"] = json!({"enable_thinking": false});
            }
            if let Some(t) = template {
                body["chat_template"] = json!(t);
            }
            out.push(("/tokenize", body.clone(), template));
            out.push(("/v1/chat/completions/render", body, template));
        }
    }
    out
}

/// The gateway's tokens for one case (None where it cannot key the request).
fn gateway_tokens(model: &Path, endpoint: &str, body: &Value, template: Option<&str>) -> Option<Vec<u32>> {
    let mut tokenizer = ModelTokenizer::load(model).unwrap();
    let mut body = body.clone();
    if let Some(t) = template {
        tokenizer = tokenizer.with_template(t.to_string());
        body.as_object_mut().unwrap().remove("chat_template");
    }
    let api = if body.get("messages").is_some() { Api::Chat } else { Api::Completions };
    let _ = endpoint;
    let request = parse(api, body.to_string().as_bytes()).unwrap();
    tokenizer.tokens(request.prompt.as_ref()?).ok()
}

fn tokens_match_vllm(py: &Path, engine: &str, model: &Path, dir: &Path) {
    let cases = cases();
    let file = dir.join("cases.json");
    let list: Vec<Value> = cases.iter().map(|(e, b, _)| json!({"endpoint": e, "body": b})).collect();
    std::fs::write(&file, serde_json::to_string(&list).unwrap()).unwrap();
    let theirs = python_result(py, "vllm_tokens.py", &[engine, file.to_str().unwrap()], &String::new);
    let (mut compared, mut refused) = (0, 0);
    for (i, (endpoint, body, template)) in cases.iter().enumerate() {
        let want: Option<Vec<u32>> = serde_json::from_value(theirs[i].clone()).ok();
        let got = gateway_tokens(model, endpoint, body, *template);
        match (&want, &got) {
            (Some(w), Some(g)) => {
                assert_eq!(g, w, "case {i} ({endpoint}): {body}");
                compared += 1;
            }
            // vLLM refused it (e.g. roles that do not alternate): nothing to compare; the engine
            // refuses such a request whatever the gateway does with it.
            (None, _) => refused += 1,
            (Some(_), None) => panic!("case {i} ({endpoint}): vLLM tokenized it, the gateway did not: {body}"),
        }
    }
    assert!(compared >= 60 && refused <= 8, "{compared} cases compared, {refused} refused by vLLM: {theirs}");
    eprintln!("{compared} of {} cases tokenized identically ({refused} refused by vLLM)", cases.len());
}

async fn engine_namespace(d: &Daemon) -> pb::NamespaceDescriptor {
    let mut c = CacheServiceClient::new(channel(&d.grpc).await.unwrap());
    let stats = c.stats(pb::NodeStatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.engines.len(), 1, "{:?}", stats.engines);
    stats.engines[0].namespaces[0].clone()
}

/// Leading blocks of `tokens` (of adapter `lora`, if any) daemon `d` holds under the gateway's
/// keys.
async fn held_by(d: &Daemon, tokens: &[u32], lora: Option<&Extra>) -> (u32, usize) {
    let desc = engine_namespace(d).await;
    let keys = adapter_request_keys(tokens, desc.tokens_per_block as usize, "", lora);
    let q = pb::PrefixQuery {
        namespace_id: NamespaceId::of(&desc).0.to_vec().into(),
        hashes: keys.iter().map(|k| bytes::Bytes::copy_from_slice(k.as_bytes())).collect(),
    };
    let mut c = CacheServiceClient::new(channel(&d.grpc).await.unwrap());
    let matched = c.lookup(pb::BatchLookupRequest { queries: vec![q] }).await.unwrap().into_inner().matches[0].matched;
    (matched, keys.len())
}

fn metric(gateway: &str, line: &str) -> f64 {
    let text = http_get(gateway, "/metrics").unwrap();
    text.lines().find_map(|l| l.strip_prefix(line)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

/// Checks a conversation's run of `gateway_client.py`: outputs equal direct requests, later
/// turns stay on the engine holding their prefix and report cached tokens, streams stream,
/// tenants' salts separate their blocks. Returns that engine.
fn conversation_checks(r: &Value) -> String {
    let turns = r["turns"].as_array().unwrap();
    let home = turns[0]["endpoint"].as_str().unwrap().to_string();
    for (i, t) in turns.iter().enumerate() {
        assert_eq!(t["text"], t["direct_text"], "turn {i}: the gateway changed the output: {t}");
        if i > 0 {
            assert_eq!(t["endpoint"], home, "turn {i} left the engine holding its prefix: {r}");
            assert!(t["cached_tokens"].as_u64().unwrap() > 0, "turn {i} reported no cached tokens: {t}");
        }
    }
    let stream = &r["stream"];
    assert_eq!(stream["endpoint"], home, "{r}");
    assert!(stream["content_type"].as_str().unwrap().contains("text/event-stream"), "{stream}");
    assert!(stream["chunks"].as_u64().unwrap() >= 3, "a stream of one piece: {stream}");
    assert_eq!(stream["text"], stream["direct_text"], "{stream}");
    assert!(stream["cached_tokens"].as_u64().unwrap() > 0, "{stream}");
    assert!(r["models"].as_array().unwrap().contains(&json!("tiny")), "{r}");
    // A tenant's second request finds its blocks where its first left them; another tenant's
    // same prompt finds nothing.
    let salted = r["salted"].as_array().unwrap();
    assert_eq!(salted[1]["endpoint"], salted[0]["endpoint"], "{salted:?}");
    assert!(salted[1]["cached_tokens"].as_u64().unwrap() > 0, "{salted:?}");
    assert_eq!(salted[2]["cached_tokens"].as_u64(), Some(0), "another tenant's salt shares nothing: {salted:?}");
    home
}

/// The tokens of the first turn of the conversation `gateway_client.py` held for `model`.
fn first_turn(model_dir: &Path, dir: &Path, model: &str) -> Vec<u32> {
    let state = dir.join(format!("conversation-{model}.json"));
    let conversation: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(state).unwrap()).unwrap();
    let first = json!({"model": model, "messages": conversation[..2]});
    let Some(prompt) = parse(Api::Chat, first.to_string().as_bytes()).unwrap().prompt else { panic!() };
    ModelTokenizer::load(model_dir).unwrap().tokens(&prompt).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_sends_each_turn_to_the_engine_holding_its_prefix() {
    let py = vllm_python();
    let tmp = tempfile::tempdir().unwrap();

    let model: PathBuf = tmp.path().join("model");
    make_model(&py, &model, &[]);
    std::fs::write(model.join("chat_template.jinja"), CHATML).unwrap();
    let adapter = tmp.path().join("adapter");
    let out = Command::new(&py).arg(repo().join("tests/e2e/make_lora.py")).args([&model, &adapter]).output().unwrap();
    assert!(out.status.success(), "make_lora.py: {}", String::from_utf8_lossy(&out.stderr));
    let lora_flag = format!("sql={}", adapter.display());
    let lora_args = ["--enable-lora", "--max-lora-rank", "8", "--lora-modules", &lora_flag];
    let daemons = [Daemon::start(&[]), Daemon::start(&[])];
    let mut engines: Vec<VllmServer> = daemons.iter().map(|d| VllmServer::start(&py, &model, d, &lora_args)).collect();
    engines.iter_mut().for_each(VllmServer::wait_ready);

    tokio::task::block_in_place(|| tokens_match_vllm(&py, &engines[0].addr, &model, tmp.path()));

    let gw = kvtier_tests::free_local_addr();
    let model_flag = format!("tiny={}", model.display());
    #[rustfmt::skip]
    let gateway = KvtierProc::start(&[
        "gateway", "--listen", &gw, "--daemon", &daemons[0].grpc, "--daemon", &daemons[1].grpc,
        "--engine", &engines[0].addr, "--engine", &engines[1].addr, "--model", &model_flag,
    ], &gw);
    let client = |model: &str, turns: &str| {
        let state = tmp.path().join(format!("conversation-{model}.json"));
        let args = [gw.as_str(), model, state.to_str().unwrap(), "--turns", turns];
        tokio::task::block_in_place(|| python_result(&py, "gateway_client.py", &args, &|| gateway.log()))
    };
    let r = client("tiny", "3");
    let home = conversation_checks(&r);
    let i = engines.iter().position(|e| e.addr == home).unwrap();
    let (matched, blocks) = held_by(&daemons[i], &first_turn(&model, tmp.path(), "tiny"), None).await;
    assert!(blocks >= 2, "a first turn of {blocks} blocks");
    assert_eq!(matched as usize, blocks, "daemon {i} holds {matched} of the first turn's {blocks} blocks");
    assert!(metric(&gw, "kvtier_gateway_decisions_total{reason=\"prefix\"}") >= 3.0);
    assert!(gateway.log().contains(&format!("route endpoint={home}")), "no decision log line");

    // The same conversation for the adapter: its blocks are keyed with ("lora", name, path), so
    // none of the base model's match, and its later turns follow the adapter's own prefix.
    for e in &engines {
        let listed = format!("kvtier_gateway_adapters{{endpoint=\"{}\"}}", e.addr);
        tokio::task::block_in_place(|| eventually("the gateway lists the adapter", || metric(&gw, &listed) == 1.0));
    }
    let prefix_before = metric(&gw, "kvtier_gateway_decisions_total{reason=\"prefix\"}");
    let base = r;
    let r = client("sql", "3");
    let home_sql = conversation_checks(&r);
    assert_ne!(r["turns"][0]["text"], base["turns"][0]["text"], "the adapter changed nothing: {r}");
    let j = engines.iter().position(|e| e.addr == home_sql).unwrap();
    let lora = Extra::lora("sql", adapter.to_str().unwrap());
    let tokens = first_turn(&model, tmp.path(), "sql");
    let (matched, blocks) = held_by(&daemons[j], &tokens, Some(&lora)).await;
    assert_eq!(matched as usize, blocks, "daemon {j} holds {matched} of the adapter's first turn's {blocks} blocks");
    assert!(metric(&gw, "kvtier_gateway_decisions_total{reason=\"prefix\"}") >= prefix_before + 3.0);
    // Its first turn has the base conversation's first tokens, but none of the base model's
    // blocks may count for it: chosen by load; the next turns by the adapter's own prefix.
    let log = gateway.log();
    let reasons: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("model=sql"))
        .filter_map(|l| l.split(" reason=").nth(1)?.split(' ').next())
        .collect();
    assert_eq!(reasons[..3], ["least-loaded", "prefix", "prefix"], "the adapter's turns:\n{log}");

    // The engine holding the conversation dies: the next turns go to the other one, and the
    // client sees no error (it does not retry: the gateway does).
    engines[i].kill();
    let r = client("tiny", "2");
    let other = &engines[1 - i].addr;
    for t in r["turns"].as_array().unwrap() {
        assert_eq!(t["endpoint"].as_str().unwrap(), other, "{r}");
        assert_eq!(t["text"], t["direct_text"], "{t}");
    }
    assert_eq!(r["stream"]["endpoint"].as_str().unwrap(), other);
    assert!(metric(&gw, "kvtier_gateway_retries_total") >= 1.0);
}
