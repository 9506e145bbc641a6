"""Checks `kvtier.layout` (the connector's description of vLLM KV tensors for daemon-side copies)
on CPU tensors: placements, strides and chunk sizes for vLLM's layouts, the byte order of a pool
slot (per layer, the block's K half then its V half), and the layouts it must refuse. Run by
tests/python_layout.rs with the vLLM venv's Python (torch); prints "LAYOUT OK"."""

import torch

from kvtier.layout import block_dim, block_slice, dma_layout

BLOCKS, TOKENS, HEADS, HEAD = 6, 4, 2, 8


def layers_of(tensors):
    return [(f"layer.{i}", t, block_dim(t, BLOCKS)) for i, t in enumerate(tensors)]


def chunk_at(t, memory, placement, block, part, chunk):
    """The chunk bytes the daemon reads for (block, part) by the registered placement."""
    _, offset, block_stride, kv_stride = placement
    flat = t.view(-1).view(torch.uint8) if t.is_contiguous() else None
    at = memory["address"] - t.data_ptr() + offset + block * block_stride + part * kv_stride
    return flat[at : at + chunk]


def slot_order(t, dim, block):
    """The block's bytes as the connector's own copy lays them out: the slice, cut in two."""
    return block_slice(t, dim, block).contiguous().view(-1).view(torch.uint8)


def check(tensors, want_kv_stride):
    layers = layers_of(tensors)
    layout = dma_layout(layers)
    assert layout is not None
    assert layout["num_blocks"] == BLOCKS
    chunk = layout["chunk_bytes"]
    assert chunk == TOKENS * HEADS * HEAD * tensors[0].element_size()
    for (_, t, dim), memory, placement in zip(layers, layout["tensors"], layout["layers"]):
        assert memory == {"address": t.data_ptr(), "bytes": t.numel() * t.element_size()}, memory
        assert placement[3] == want_kv_stride(t), (placement, want_kv_stride(t))
        for block in range(BLOCKS):
            whole = slot_order(t, dim, block)
            for part in range(2):
                got = chunk_at(t, memory, placement, block, part, chunk)
                assert torch.equal(got, whole[part * chunk : (part + 1) * chunk]), (dim, block, part)


def main():
    el = torch.tensor([], dtype=torch.float16).element_size()
    chunk = TOKENS * HEADS * HEAD * el
    # FlashAttention: per layer [2, blocks, tokens, heads, head]; K and V apart.
    flash_attn = [torch.randn(2, BLOCKS, TOKENS, HEADS, HEAD).to(torch.float16) for _ in range(3)]
    check(flash_attn, lambda t: BLOCKS * chunk)
    # FlashInfer / CPU: per layer [blocks, 2, tokens, heads, head]; one run per block.
    flash_infer = [torch.randn(BLOCKS, 2, TOKENS, HEADS, HEAD).to(torch.float16) for _ in range(3)]
    check(flash_infer, lambda t: chunk)
    # Refused: a non-contiguous tensor, layers of different chunk sizes, an odd block.
    assert dma_layout(layers_of([flash_infer[0].transpose(2, 3)])) is None
    other = torch.randn(BLOCKS, 2, TOKENS, HEADS, 2 * HEAD).to(torch.float16)
    assert dma_layout(layers_of([flash_infer[0], other])) is None
    assert dma_layout(layers_of([torch.zeros(BLOCKS, 3, dtype=torch.uint8)])) is None
    assert dma_layout([]) is None
    try:
        block_dim(torch.zeros(BLOCKS, BLOCKS), BLOCKS)
    except ValueError:
        pass
    else:
        raise AssertionError("an ambiguous block dimension is refused")
    check_hybrid_refused()
    print("LAYOUT OK")


def check_hybrid_refused():
    """A KV cache in several groups (vLLM's hybrid manager: sliding-window and full-attention
    layers under separate block tables) is refused at start, naming the layout."""
    from types import SimpleNamespace as Ns

    from kvtier.vllm.common import _namespace_descriptor

    class SlidingWindowSpec:
        pass

    class FullAttentionSpec:
        pass

    config = Ns(model_config=Ns(), cache_config=Ns(), parallel_config=Ns())
    groups = [Ns(kv_cache_spec=FullAttentionSpec(), layer_names=["a"]),
              Ns(kv_cache_spec=SlidingWindowSpec(), layer_names=["b"])]
    try:
        _namespace_descriptor(config, Ns(kv_cache_groups=groups))
    except NotImplementedError as e:
        assert "2 groups (FullAttentionSpec, SlidingWindowSpec)" in str(e), e
    else:
        raise AssertionError("a hybrid KV cache is refused")


if __name__ == "__main__":
    main()
