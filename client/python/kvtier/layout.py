"""Where each block of an engine's per-layer KV tensors lies, for daemon-side copies.

A kvtier block is one engine block across all layers: per layer, the block's slice as two halves
(K then V). `dma_layout` describes the tensors as `Client.register_kv_cache` takes them: host
memory by address (the daemon reads it with cross-memory attach) and CUDA memory by IPC handle
(the daemon maps it into its own context). No vLLM import, so tools and tests use it directly."""


def block_dim(t, num_blocks):
    """The dimension of a per-layer KV tensor that indexes blocks: the one of `num_blocks`."""
    dims = [d for d in range(t.dim()) if t.shape[d] == num_blocks]
    if len(dims) != 1:
        raise ValueError(f"kvtier: cannot tell the block dimension of a KV tensor of shape {tuple(t.shape)}")
    return dims[0]


def block_slice(t, dim, block_id):
    """Block `block_id` of a per-layer KV tensor whose block dimension is `dim`."""
    return t.select(dim, block_id)


def _memory(t, el):
    """How the daemon finds tensor `t`: by address in host memory, by IPC handle in CUDA memory;
    None for other devices or memory that cannot be shared."""
    n = t.numel() * el
    if t.device.type == "cpu":
        return {"address": t.data_ptr(), "bytes": n}
    if t.device.type == "cuda":
        from . import cuda

        try:
            handle, offset, _ = cuda.export_allocation(t)
            uuid = cuda.gpu_uuid(t.device)
        except OSError:
            return None
        return {"ipc_handle": handle, "ipc_offset": offset, "bytes": n, "device_uuid": uuid}
    return None


def dma_layout(layers):
    """`layers`: `(name, tensor, block dim)` per layer. How the daemon finds each block of
    contiguous KV tensors, in the byte order of a pool slot (per layer, the block's slice as two
    halves, K then V), as keyword arguments of `Client.register_kv_cache`; None if the tensors are
    not contiguous memory of one kind (host or CUDA) and of a supported shape."""
    tensors, placements, chunk = [], [], None
    for _, t, dim in layers:
        if not t.is_contiguous() or t.device != layers[0][1].device:
            return None
        el = t.element_size()
        block = block_slice(t, dim, 0)
        half, odd = divmod(block.numel() * el, 2)
        if odd or chunk not in (None, half):
            return None
        if block.is_contiguous():
            kv_stride = half  # [blocks, ...]: one contiguous run per block, cut in two
        elif dim == 1 and t.shape[0] == 2 and block[0].is_contiguous():
            kv_stride = t.stride(0) * el  # [2, blocks, ...]: K and V apart
        else:
            return None
        memory = _memory(t, el)
        if memory is None:
            return None
        chunk = half
        placements.append((len(tensors), 0, t.stride(dim) * el, kv_stride))
        tensors.append(memory)
    if not tensors:
        return None
    num_blocks = layers[0][1].shape[layers[0][2]]
    return dict(tensors=tensors, layers=placements, num_blocks=num_blocks, chunk_bytes=chunk)
