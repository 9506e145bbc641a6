"""Sends prompts (token ids) one at a time to a vLLM OpenAI server's /v1/completions, greedy,
with the sampled tokens' logprobs, pausing between them (so that the connector's saves of one
prompt land before the next is looked up).

usage: python server_outputs.py HOST:PORT PROMPTS_JSON [--max-tokens N] [--pause S]
Prints `RESULT {"texts": [...], "logprobs": [[...]...], "cached_tokens": [...]}`.
"""

import argparse
import json
import time
import urllib.request


def complete(addr, prompt, max_tokens):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "logprobs": 0}
    req = urllib.request.Request(f"http://{addr}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=300))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("addr")
    ap.add_argument("prompts")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--pause", type=float, default=1.0)
    a = ap.parse_args()
    out = {"texts": [], "logprobs": [], "cached_tokens": []}
    for i, prompt in enumerate(json.load(open(a.prompts))):
        if i:
            time.sleep(a.pause)
        r = complete(a.addr, prompt, a.max_tokens)
        choice = r["choices"][0]
        out["texts"].append(choice["text"])
        out["logprobs"].append(choice["logprobs"]["token_logprobs"])
        details = r["usage"].get("prompt_tokens_details") or {}
        out["cached_tokens"].append(details.get("cached_tokens") or 0)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
