"""Runs the real vLLM (CPU build) on prompts given as token ids, optionally with KvTierConnector.

Batch mode prints one line `RESULT {"outputs": [[ids]...], "cached_tokens": [...], "ttft": [...]}`.
With --interactive it prints `READY`, then for each prompt index read from stdin one line
`RESULT {"output": [ids], "cached_tokens": n, "ttft": s}`, so a test can act between requests.

With --logprobs the batch RESULT also has "logprobs": the chosen tokens' logprobs, per prompt.

usage: python run_vllm.py MODEL_DIR PROMPTS_JSON [--socket PATH] [--max-tokens N] [--interactive]
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("prompts", help="JSON file: a list of prompts, each a list of token ids")
    ap.add_argument("--socket", help="kvtierd socket; without it vLLM runs without kvtier")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prefix-caching", action="store_true", help="enable vLLM's own prefix cache")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--interactive", action="store_true")
    ap.add_argument("--stats-file", help="the connector writes its totals to STATS_FILE.{scheduler,worker}")
    ap.add_argument("--pause", type=float, default=0.0, help="seconds to wait between prompts")
    ap.add_argument("--kv-cache-gib", default="1", help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--transfer-source", help="prefill role: this daemon's TransferService address")
    ap.add_argument("--emit-params", help="write each output's kv_transfer_params (a JSON list) here")
    ap.add_argument("--params", help="decode role: JSON list of kv_transfer_params, one per prompt")
    ap.add_argument("--save-piece-bytes", type=int, help="the connector's save_piece_bytes")
    ap.add_argument("--pull-piece-bytes", type=int, help="the connector's pull_piece_bytes")
    ap.add_argument("--warm-up", action="store_true",
                    help="first run one short untimed prompt, so the first timed one pays no first-call costs")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--block-size", type=int, help="vLLM's block size (its default otherwise)")
    ap.add_argument("--kv-cache-dtype", help="vLLM's kv_cache_dtype (e.g. fp8; the model's dtype otherwise)")
    ap.add_argument("--logprobs", action="store_true", help="report the sampled tokens' logprobs")
    ap.add_argument("--in-process", action="store_true",
                    help="run the engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): each step "
                         "then batches exactly the requests added before it, whatever the timing")
    a = ap.parse_args()
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = a.kv_cache_gib
    if a.in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kw = {}
    if a.socket:
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KvTierConnector",
            kv_connector_module_path="kvtier.vllm",
            kv_role="kv_both",
            kv_connector_extra_config={
                "socket": a.socket,
                **({"stats_file": a.stats_file} if a.stats_file else {}),
                **({"transfer_source": a.transfer_source} if a.transfer_source else {}),
                **({"save_piece_bytes": a.save_piece_bytes} if a.save_piece_bytes else {}),
                **({"pull_piece_bytes": a.pull_piece_bytes} if a.pull_piece_bytes else {}),
            },
        )
    if a.block_size:
        kw["block_size"] = a.block_size
    if a.kv_cache_dtype:
        kw["kv_cache_dtype"] = a.kv_cache_dtype
    llm = LLM(model=a.model, dtype=a.dtype, max_model_len=a.max_model_len, enforce_eager=True,
              enable_prefix_caching=a.prefix_caching, seed=0, **kw)
    prompts = json.load(open(a.prompts))
    transfer = json.load(open(a.params)) if a.params else None
    emitted = []
    logprobs = []

    def run(p, i=0):
        extra = {"kv_transfer_params": transfer[i]} if transfer and transfer[i] else None
        params = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True, extra_args=extra,
                                logprobs=0 if a.logprobs else None)
        t = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0]
        emitted.append(out.kv_transfer_params)
        chosen = out.outputs[0]
        if a.logprobs:
            logprobs.append([d[tok].logprob for tok, d in zip(chosen.token_ids, chosen.logprobs)])
        return list(chosen.token_ids), out.num_cached_tokens or 0, time.perf_counter() - t

    if a.warm_up:
        # Shorter than a block: nothing to look up, load or save.
        llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], SamplingParams(max_tokens=1), use_tqdm=False)
    if a.interactive:
        print("READY", flush=True)
        for line in sys.stdin:
            if not line.strip():
                continue
            output, cached, secs = run(prompts[int(line)])
            print("RESULT " + json.dumps({"output": output, "cached_tokens": cached, "ttft": secs}), flush=True)
        return
    results = []
    for i, p in enumerate(prompts):
        if i and a.pause:
            time.sleep(a.pause)  # lets asynchronous saves of the previous prompt land
        results.append(run(p, i))
    if a.emit_params:
        json.dump(emitted, open(a.emit_params, "w"))
    print("RESULT " + json.dumps({
        "outputs": [r[0] for r in results],
        "cached_tokens": [r[1] for r in results],
        "ttft": [r[2] for r in results],
        **({"logprobs": logprobs} if a.logprobs else {}),
    }), flush=True)


if __name__ == "__main__":
    main()
