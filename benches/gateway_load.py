"""Replays requests at their arrival times against an OpenAI completions API, streaming, and
measures each one's time to first token. Used by `benches/gateway.rs`.

usage: python gateway_load.py REQUESTS_JSON TARGET [TARGET...]
REQUESTS_JSON: [{"at": seconds, "prompt": [token ids], "max_tokens": n}, ...]. With one TARGET
(host:port, e.g. the gateway) every request goes there; with several they take turns
(round-robin). Prints `RESULT [{"ttft": s, "endpoint": ..., "prompt_tokens": n,
"cached_tokens": n, "error": null}, ...]`.
"""

import asyncio
import json
import sys
import time

import httpx


async def one(client, target, req, start):
    await asyncio.sleep(max(0.0, start + req["at"] - time.monotonic()))
    body = {"model": "tiny", "prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    sent = time.monotonic()
    out = {"ttft": None, "endpoint": target, "prompt_tokens": len(req["prompt"]), "cached_tokens": 0, "error": None}
    try:
        async with client.stream("POST", f"http://{target}/v1/completions", json=body, timeout=600) as r:
            out["endpoint"] = r.headers.get("x-kvtier-endpoint", target)
            if r.status_code != 200:
                out["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if out["ttft"] is None and chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                    out["ttft"] = time.monotonic() - sent
                usage = chunk.get("usage")
                if usage:
                    details = usage.get("prompt_tokens_details") or {}
                    out["prompt_tokens"] = usage.get("prompt_tokens", out["prompt_tokens"])
                    out["cached_tokens"] = details.get("cached_tokens") or 0
    except Exception as e:  # reported, not raised: one failure must not hide the others
        out["error"] = repr(e)
    return out


async def main():
    requests = json.load(open(sys.argv[1]))
    targets = sys.argv[2:]
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits) as client:
        start = time.monotonic() + 0.5
        tasks = [one(client, targets[i % len(targets)], r, start) for i, r in enumerate(requests)]
        results = await asyncio.gather(*tasks)
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
