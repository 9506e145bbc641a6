//! The connector's block keys (Python, `kvtier.keys`) equal the gateway's (Rust,
//! `kvtier_core::block_key`) for prompts of every length and every kind of extra key vLLM gives
//! a block: LoRA adapters, multimodal items, a cache salt, prompt-embedding digests.

use kvtier_core::block_key::{block_keys, Extra};
use kvtier_tests::{output_with_input, repo, vllm_python};
use serde_json::{json, Value};
use std::process::Command;

const SCRIPT: &str = r#"
import json, sys
from kvtier.keys import block_keys
out = []
for case in json.load(sys.stdin):
    def extras(i, case=case):
        e = case["extras"].get(str(i))
        return None if e is None else tuple(decode(x) for x in e)
    out.append([k.hex() for k in block_keys(case["tokens"], case["block"], extras)])
print(json.dumps(out))
"#;

/// Extras travel as JSON: strings, integers, {"bytes": hex} and lists (tuples).
const DECODE: &str = r#"
def decode(x):
    if isinstance(x, dict):
        return bytes.fromhex(x["bytes"])
    if isinstance(x, list):
        return tuple(decode(y) for y in x)
    return x
"#;

fn to_json(e: &Extra) -> Value {
    match e {
        Extra::Str(s) => json!(s),
        Extra::Int(i) => json!(i),
        Extra::Bytes(b) => json!({"bytes": b.iter().map(|x| format!("{x:02x}")).collect::<String>()}),
        Extra::Tuple(items) => Value::Array(items.iter().map(to_json).collect()),
    }
}

#[test]
fn the_connector_and_the_gateway_key_blocks_alike() {
    let s = |x: &str| Extra::Str(x.into());
    let lora = Extra::Tuple(vec![s("lora"), s("adapter-1"), s("/adapters/1")]);
    let image = Extra::Tuple(vec![s("mm-hash-0"), Extra::Int(-3)]);
    let embeds = Extra::Tuple(vec![s("prompt_embeds"), Extra::Bytes(vec![0, 1, 254, 255])]);
    let mut x = 99u64;
    let mut cases = Vec::new();
    for (n, block) in [(0usize, 16usize), (15, 16), (16, 16), (100, 16), (257, 32), (1024, 64), (300, 128)] {
        let tokens: Vec<u32> = (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (x >> 35) as u32
            })
            .collect();
        let extras = |i: usize| -> Vec<Extra> {
            let mut e = vec![lora.clone()];
            if i == 0 {
                e.push(Extra::cache_salt("tenant-ü"));
            }
            if i % 3 == 1 {
                e.push(image.clone());
                e.push(embeds.clone());
            }
            e
        };
        let want: Vec<String> = block_keys(&tokens, block, extras)
            .iter()
            .map(|k| k.as_bytes().iter().map(|b| format!("{b:02x}")).collect())
            .collect();
        let per_block: serde_json::Map<String, Value> =
            (0..n / block).map(|i| (i.to_string(), Value::Array(extras(i).iter().map(to_json).collect()))).collect();
        cases.push((json!({"tokens": tokens, "block": block, "extras": per_block}), want));
    }
    let input = Value::Array(cases.iter().map(|(c, _)| c.clone()).collect()).to_string();
    let mut python = Command::new(vllm_python());
    python.args(["-c", &format!("{DECODE}{SCRIPT}")]).env("PYTHONPATH", repo().join("client/python"));
    let out = output_with_input(&mut python, input.as_bytes());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Vec<Vec<String>> = serde_json::from_slice(&out.stdout).unwrap();
    for ((case, want), got) in cases.iter().zip(&got) {
        assert_eq!(got, want, "tokens {} block {}", case["tokens"].as_array().unwrap().len(), case["block"]);
    }
    // Full blocks only: 0, 0, 1, 6, 8, 16 and 2 of them.
    assert_eq!(got.iter().map(Vec::len).sum::<usize>(), 33);
}
