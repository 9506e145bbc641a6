"""Asks a running vLLM OpenAI server for the token ids of each case: `/tokenize`, or the
`/v1/chat/completions/render` and `/v1/completions/render` endpoints (`--enable-scale-out`).

usage: python vllm_tokens.py HOST:PORT CASES_JSON
CASES_JSON: a list of {"endpoint": PATH, "body": {...}}. Prints `RESULT [ids or {"error": why},
...]` (an error where vLLM refused the request).
"""

import json
import sys
import urllib.error
import urllib.request


def tokens(addr, endpoint, body):
    req = urllib.request.Request(f"http://{addr}{endpoint}", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        reply = json.load(urllib.request.urlopen(req, timeout=60))
    except urllib.error.HTTPError as e:
        return {"error": e.read().decode(errors="replace")[:500]}
    if isinstance(reply, list):  # completions render: one entry per prompt
        reply = reply[0]
    return reply.get("tokens") or reply.get("token_ids")


def main():
    addr, cases = sys.argv[1], json.load(open(sys.argv[2]))
    print("RESULT " + json.dumps([tokens(addr, c["endpoint"], c["body"]) for c in cases]), flush=True)


if __name__ == "__main__":
    main()
