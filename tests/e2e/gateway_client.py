"""Drives a multi-turn conversation through `kvtier gateway` with the official `openai` client,
the way an application would, and asks each engine directly for the same turns to compare.

Prints one line `RESULT {...}`: for every turn the engine that served it (the gateway's
`x-kvtier-endpoint` header), the prompt and cached token counts it reported, the text, and the
text the same engine gave the same request sent to it directly; then a streamed turn (chunks
received, text), a completions turn, and one prompt sent under two tenants' cache salts.

usage: python gateway_client.py GATEWAY MODEL STATE_JSON [--turns N] [--pause S]
STATE_JSON holds the conversation: read if it exists (a later phase continues it), written back.
"""

import argparse
import json
import os
import time

from openai import OpenAI

SYSTEM = " ".join(f"alpha{i % 13} beta{i % 7} gamma{i % 5} cache block" for i in range(60))


def ask(client, model, messages, **kw):
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=8, temperature=0.0, **kw
    )
    return raw.headers.get("x-kvtier-endpoint"), raw.parse()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gateway")
    ap.add_argument("model")
    ap.add_argument("state")
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--pause", type=float, default=1.0)
    a = ap.parse_args()
    # No retries: any error the gateway lets through fails the run.
    gw = OpenAI(base_url=f"http://{a.gateway}/v1", api_key="unused", max_retries=0, timeout=120)
    messages = json.load(open(a.state)) if os.path.exists(a.state) else [{"role": "system", "content": SYSTEM}]
    turns = []
    for t in range(a.turns):
        messages.append({"role": "user", "content": f"turn {len(messages)} delta{t} tier node prefix token"})
        endpoint, r = ask(gw, a.model, messages)
        direct = OpenAI(base_url=f"http://{endpoint}/v1", api_key="unused", max_retries=0, timeout=120)
        _, d = ask(direct, a.model, messages)
        details = r.usage.prompt_tokens_details
        turns.append({
            "endpoint": endpoint,
            "prompt_tokens": r.usage.prompt_tokens,
            "cached_tokens": details.cached_tokens if details else None,
            "text": r.choices[0].message.content,
            "direct_text": d.choices[0].message.content,
        })
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
        time.sleep(a.pause)
    # A streamed turn: chunks pass through as the engine sends them.
    messages.append({"role": "user", "content": "stream it delta tier"})
    raw = gw.chat.completions.with_raw_response.create(
        model=a.model, messages=messages, max_tokens=8, temperature=0.0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks, text, usage = 0, "", None
    for chunk in raw.parse():
        chunks += 1
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        usage = chunk.usage or usage
    _, d = ask(OpenAI(base_url=f"http://{raw.headers.get('x-kvtier-endpoint')}/v1", api_key="unused"), a.model, messages)
    stream = {"endpoint": raw.headers.get("x-kvtier-endpoint"), "chunks": chunks, "text": text,
              "direct_text": d.choices[0].message.content,
              "content_type": raw.headers.get("content-type"),
              "cached_tokens": usage.prompt_tokens_details.cached_tokens if usage and usage.prompt_tokens_details else None}
    messages.append({"role": "assistant", "content": text})
    # The completions API with a text prompt.
    raw = gw.completions.with_raw_response.create(model=a.model, prompt=SYSTEM + " completion", max_tokens=4, temperature=0.0)
    completion = {"endpoint": raw.headers.get("x-kvtier-endpoint"), "text": raw.parse().choices[0].text}
    # Tenants: the same prompt under one salt again (its blocks are that tenant's, on the engine
    # that served it), then under another salt (nothing cached for it anywhere).
    salted = []
    for salt in ("a", "a", "b"):
        raw = gw.completions.with_raw_response.create(
            model=a.model, prompt=SYSTEM + " salted", max_tokens=2, temperature=0.0,
            extra_body={"cache_salt": f"tenant-{salt}-{len(messages)}"},
        )
        details = raw.parse().usage.prompt_tokens_details
        salted.append({"endpoint": raw.headers.get("x-kvtier-endpoint"),
                       "cached_tokens": details.cached_tokens if details else None})
        time.sleep(a.pause)
    models = [m.id for m in gw.models.list().data]
    json.dump(messages, open(a.state, "w"))
    result = {"turns": turns, "stream": stream, "completion": completion, "salted": salted, "models": models}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
