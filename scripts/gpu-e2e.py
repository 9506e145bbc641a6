"""GPU end to end, run by scripts/gpu-check on a machine with an NVIDIA GPU and torch: a real
kvtierd with `--device-backend cuda`, and this process as the engine with KV tensors allocated the
way vLLM allocates them (one raw buffer per layer, viewed as FlashAttention's
`[2, blocks, block_size, kv_heads, head_size]` in bf16, and FlashInfer's `[blocks, 2, ...]`).

It registers them through the connector's own `kvtier.layout.dma_layout` (CUDA IPC handles),
saves blocks once the kernels writing them have completed (as the connector's saver thread
does), loads them into other blocks behind an event of the engine's stream with the reply coming
once the copy is queued (the engine's stream waits for the daemon's event), and compares bytes on
the GPU. Then it measures offload and onload of 1 GiB through the daemon against pinned
`cudaMemcpy` of the same bytes (torch `copy_` between one device buffer and pinned host memory),
best of 5 each, and prints the ratios.

    python3 scripts/gpu-e2e.py KVTIERD_BINARY
"""

import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "client", "python"))
from kvtier.client import Client  # noqa: E402
from kvtier.cuda import StreamEvents  # noqa: E402
from kvtier.layout import block_dim, dma_layout  # noqa: E402

LAYERS, BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_SIZE = 32, 1024, 16, 8, 128
DTYPE = torch.bfloat16
CHUNK = BLOCK_SIZE * KV_HEADS * HEAD_SIZE * 2  # bytes of K (or V) of one block in one layer
BLOCK_BYTES = LAYERS * 2 * CHUNK  # 2 MiB
BENCH_BLOCKS = 512  # 1 GiB


def kv_caches(flash_infer):
    """Per layer, a raw int8 buffer viewed as vLLM's attention backends view it."""
    out = {}
    for layer in range(LAYERS):
        raw = torch.zeros(2 * BLOCKS * CHUNK, dtype=torch.int8, device="cuda")
        shape = (BLOCKS, 2) if flash_infer else (2, BLOCKS)
        out[f"model.layers.{layer}.self_attn"] = raw.view(DTYPE).view(*shape, BLOCK_SIZE, KV_HEADS, HEAD_SIZE)
    return out


def blocks_of(t, flash_infer, ids):
    return t[ids] if flash_infer else t[:, ids]


def start_daemon(binary, workdir):
    sock = os.path.join(workdir, "kvtierd.sock")
    cmd = [binary, "--socket", sock, "--pool-bytes", "8 GiB", "--slab-bytes", "4 MiB", "--allow-unlocked",
           "--device-backend", "cuda", "--metrics-listen", ""]
    daemon = subprocess.Popen(cmd, env=dict(os.environ, RUST_LOG="info"))
    for _ in range(600):
        if os.path.exists(sock):
            return daemon, sock
        if daemon.poll() is not None:
            sys.exit(f"kvtierd exited with {daemon.returncode}")
        time.sleep(0.05)
    sys.exit("kvtierd did not open its socket")


def descriptor(tag, flash_infer):
    return {"model": f"gpu-e2e-{tag}", "tokens_per_block": BLOCK_SIZE, "num_layers": LAYERS, "kv_heads": KV_HEADS,
            "head_size": HEAD_SIZE, "kv_dtype": "bfloat16", "layout": "flashinfer" if flash_infer else "flash-attn",
            "block_bytes": BLOCK_BYTES}


def register(client, caches, flash_infer, tag):
    names = sorted(caches)
    layers = [(n, caches[n], block_dim(caches[n], BLOCKS)) for n in names]
    layout = dma_layout(layers)
    assert layout is not None, "CUDA KV tensors are described by IPC handle"
    assert all(len(t["ipc_handle"]) == 64 for t in layout["tensors"]), layout["tensors"][0]
    ns = client.register(descriptor(tag, flash_infer))
    assert all(len(t["device_uuid"]) == 16 for t in layout["tensors"]), "tensors name their GPU"
    cache, error = client.register_kv_cache(ns, **layout)
    assert not error, f"the daemon opens the engine's KV memory: {error}"
    elsewhere = dict(layout, tensors=[dict(t, device_uuid=bytes(16)) for t in layout["tensors"]])
    _, error = client.register_kv_cache(ns, **elsewhere)
    assert "no GPU with UUID" in error, f"a GPU the daemon does not see is refused: {error!r}"
    return ns, cache, [caches[n] for n in names]


def hashes(prompt, n):
    return [prompt.to_bytes(8, "little") + i.to_bytes(8, "little") for i in range(n)]


def check_round_trip(client, flash_infer):
    """Saves 40 blocks written by kernels still running, loads them into 40 other blocks."""
    tag = "flashinfer" if flash_infer else "flash-attn"
    caches = kv_caches(flash_infer)
    ns, cache, tensors = register(client, caches, flash_infer, tag)
    events = StreamEvents("cuda")
    src = list(range(3, 123, 3))  # 40 blocks
    dst = list(range(600, 640))
    for i, t in enumerate(tensors):  # kernels writing the blocks, queued and not waited for
        t.copy_(torch.randn(t.shape, device="cuda", dtype=torch.float32).to(DTYPE) * (i + 1))
    events.record().synchronize()  # as the connector's saver thread does: save written blocks
    hs = hashes(1 if flash_infer else 2, len(src))
    r = client.save_kv(cache, hs, src)
    assert (r.saved, r.error) == (len(src), ""), r
    others = list(range(700, 760))
    before = [blocks_of(t, flash_infer, others) for t in tensors]  # copies, queued on the stream
    free = events.mark()
    r = client.load_kv(cache, hs, dst, wait_event=free, return_event=True)
    assert (r.loaded, r.error) == (len(src), ""), r
    assert len(r.done_event) == 64, "a GPU load is answered with the daemon's event"
    events.wait(r.done_event)  # no CPU wait: the comparison below is queued behind the copy
    for layer, t in enumerate(tensors):
        same = torch.equal(blocks_of(t, flash_infer, dst), blocks_of(t, flash_infer, src))
        assert same, f"{tag}: layer {layer} holds the saved blocks after the load"
        assert torch.equal(blocks_of(t, flash_infer, others), before[layer]), "other blocks keep their bytes"
    # The pool's copy through the client's own mapping equals the engine's block (layer 0, K).
    lease, slots = client.acquire(ns, hs[:1])
    pooled = torch.frombuffer(bytearray(client.view(slots[0], BLOCK_BYTES)), dtype=torch.uint8)
    k0 = blocks_of(tensors[0], flash_infer, [src[0]])[0, 0].contiguous().view(torch.uint8).flatten().cpu()
    assert torch.equal(pooled[:CHUNK], k0), "pool slot layout: layer 0's K first"
    client.release(lease)
    print(f"round trip ({tag}): 40 blocks x {LAYERS} layers saved once written and loaded behind the "
          "engine's and the daemon's events, byte-exact")
    return caches


def check_ordering(client):
    """The events really order a load: the engine's stream is kept busy (a GPU spin kernel) before
    it overwrites the blocks the load targets; a daemon that did not wait for the engine's event
    would have its load overwritten; and the LoadKv reply comes while the engine's stream is
    still busy (no CPU thread waited). The blocks saved first are written behind another spin, as
    the saver thread does: it waits for them to be written."""
    caches = kv_caches(False)
    _, cache, tensors = register(client, caches, False, "ordering")
    events = StreamEvents("cuda")
    ids, dst = list(range(10)), list(range(20, 30))
    fresh = [torch.randn(blocks_of(t, False, ids).shape, device="cuda").to(DTYPE) for t in tensors]
    # Indexes on the GPU: indexing with a Python list uploads it from pageable memory, which
    # would make this thread wait for the sleep below.
    ids_t, dst_t = torch.tensor(ids, device="cuda"), torch.tensor(dst, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # a spin kernel on the engine's stream
    for t, f in zip(tensors, fresh):
        t.index_copy_(1, ids_t, f)  # queued behind the sleep
    events.record().synchronize()  # the saver thread waits for the writes, the engine's does not
    hs = hashes(3, len(ids))
    r = client.save_kv(cache, hs, ids)
    assert (r.saved, r.error) == (len(ids), ""), r
    torch.cuda._sleep(1_000_000_000)
    for t in tensors:
        t.index_fill_(1, dst_t, 0)  # the blocks' previous owner, still writing when the load is asked for
    free = events.mark()
    t0 = time.perf_counter()
    r = client.load_kv(cache, hs, dst, wait_event=free, return_event=True)
    replied = time.perf_counter() - t0
    busy = not torch.cuda.current_stream().query()
    print(f"ordering: LoadKv answered in {replied * 1e3:.2f} ms; engine stream still busy then: {busy}")
    assert (r.loaded, r.error) == (len(ids), ""), r
    events.wait(r.done_event)
    for layer, (t, f) in enumerate(zip(tensors, fresh)):
        assert torch.equal(blocks_of(t, False, dst), f), f"layer {layer}: the load landed after the engine's writes"
    assert busy, "the LoadKv reply came while the engine's stream was still busy"
    print("ordering: loads wait on the GPU for the blocks' previous writes and the engine's stream for "
          "the load; the engine thread did not wait for the GPU")


def best_of(n, fn):
    best = float("inf")
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def bench(client):
    caches = kv_caches(False)
    ns, cache, tensors = register(client, caches, False, "bench")
    for t in tensors:
        t.copy_(torch.randn(t.shape, device="cuda").to(DTYPE))
    events = StreamEvents("cuda")
    ids = list(range(BENCH_BLOCKS))
    nbytes = BENCH_BLOCKS * BLOCK_BYTES
    rounds = iter(range(1, 1000))

    def offload():
        # New hashes each round, so every round copies (a held block is not saved again).
        events.record().synchronize()
        r = client.save_kv(cache, hashes(100 + next(rounds), BENCH_BLOCKS), ids)
        assert r.saved == BENCH_BLOCKS, r

    offload_s = best_of(5, offload)
    held = hashes(100 + 5, BENCH_BLOCKS)
    dst = list(range(BENCH_BLOCKS, 2 * BENCH_BLOCKS))

    def onload():
        r = client.load_kv(cache, held, dst, wait_event=events.mark(), return_event=True)
        assert r.loaded == BENCH_BLOCKS, r
        events.wait(r.done_event)

    onload_s = best_of(5, onload)

    replies = []

    def onload_16():
        t = time.perf_counter()
        r = client.load_kv(cache, held[:16], dst[:16], wait_event=events.mark(), return_event=True)
        replies.append(time.perf_counter() - t)
        assert r.loaded == 16, r
        events.wait(r.done_event)

    small_s = best_of(20, onload_16)

    def connector_copy():
        # The fallback without daemon-side copies: the connector copies each block's layers
        # between its tensors and its own mapping of the pool (`KvTierConnector._copy_block`).
        lease, slots = client.acquire(ns, held[:64])
        for block, slot in zip(dst[:64], slots):
            pool = torch.frombuffer(client.view(slot, BLOCK_BYTES), dtype=torch.uint8)
            at = 0
            for t in tensors:
                src = t.select(1, block)
                n = src.numel() * src.element_size()
                src.copy_(pool[at : at + n].view(DTYPE).view(src.shape))
                at += n
        client.release(lease)

    fallback_s = best_of(3, connector_copy) * BENCH_BLOCKS / 64
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    d2h = best_of(5, lambda: host.copy_(dev, non_blocking=True))
    h2d = best_of(5, lambda: dev.copy_(host, non_blocking=True))
    small = 16 * BLOCK_BYTES
    h2d_small = best_of(20, lambda: dev[:small].copy_(host[:small], non_blocking=True))
    gb = nbytes / 1e9
    print(f"bandwidth, {nbytes >> 20} MiB = {BENCH_BLOCKS} blocks x {LAYERS} layers x K/V "
          f"({LAYERS * 2 * BENCH_BLOCKS} chunks of {CHUNK >> 10} KiB), best of 5:")
    print(f"  offload  kvtierd SaveKv {gb / offload_s:6.1f} GB/s   pinned cudaMemcpy D2H {gb / d2h:6.1f} GB/s   "
          f"ratio {d2h / offload_s:.2f}x")
    print(f"  onload   kvtierd LoadKv {gb / onload_s:6.1f} GB/s   pinned cudaMemcpy H2D {gb / h2d:6.1f} GB/s   "
          f"ratio {h2d / onload_s:.2f}x")
    print(f"  onload   connector copy through its pool mapping (no daemon-side copies): {gb / fallback_s:6.1f} GB/s")
    print(f"  onload of 16 blocks (32 MiB, a 256-token prefix), best of 20: kvtierd LoadKv {small_s * 1e3:.2f} ms   "
          f"pinned cudaMemcpy H2D {h2d_small * 1e3:.2f} ms   ratio {h2d_small / small_s:.2f}x   "
          f"(reply after {min(replies) * 1e3:.2f} ms, median {sorted(replies)[len(replies) // 2] * 1e3:.2f} ms)")


def check_abandoned_load(sock):
    """A client that closes right after a load was queued: the daemon keeps the blocks pinned
    until the copy has completed, then carries on serving."""
    client = Client(sock, name="gpu-e2e-abandon", timeout=60.0, hello_timeout=10.0)
    caches = kv_caches(False)
    _, cache, tensors = register(client, caches, False, "abandon")
    hs = hashes(7, 64)
    assert client.save_kv(cache, hs, list(range(64))).saved == 64
    r = client.load_kv(cache, hs, list(range(64, 128)), return_event=True)
    assert r.loaded == 64 and len(r.done_event) == 64, r
    client.close()
    again = Client(sock, name="gpu-e2e-after", timeout=60.0, hello_timeout=10.0)
    assert again.stats() is not None
    again.close()
    torch.cuda.synchronize()
    print("a client closing while its load is queued: the daemon finishes the copy and carries on")


def main():
    binary = sys.argv[1]
    with tempfile.TemporaryDirectory() as workdir:
        daemon, sock = start_daemon(binary, workdir)
        try:
            client = Client(sock, name="gpu-e2e", timeout=60.0, hello_timeout=10.0)
            assert (client.hello.device_backend, client.hello.device_dma) == ("cuda", True), client.hello
            print(f"kvtierd device backend: {client.hello.device_backend}, daemon-side copies offered")
            check_round_trip(client, flash_infer=False)
            check_round_trip(client, flash_infer=True)
            check_ordering(client)
            bench(client)
            client.close()
            check_abandoned_load(sock)
            print("GPU E2E PASSED")
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)


if __name__ == "__main__":
    main()
