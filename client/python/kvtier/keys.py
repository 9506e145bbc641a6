"""Block keys from token ids, as `kvtier-core`'s `block_key` computes them (docs/keying.md): the
keys the vLLM connector saves and loads a prompt's blocks under, and that `kvtier gateway` computes
from a request. They depend on the tokens, the block size and vLLM's per-block extra keys (LoRA,
cache salt, multimodal items, prompt embeddings), never on vLLM's hash algorithm or seed."""

import hashlib
import struct

_DOMAIN = b"kvtier.block.v1\0"
_ROOT = bytes(32)


def _encode(item, out):
    if isinstance(item, str):
        b = item.encode()
        out += b"s" + struct.pack("<I", len(b)) + b
    elif isinstance(item, (bytes, bytearray)):
        out += b"b" + struct.pack("<I", len(item)) + bytes(item)
    elif isinstance(item, bool) or not isinstance(item, (int, tuple, list)):
        # Anything else (floats, objects) has no stable encoding shared with the router: its
        # repr keeps the key distinct, and such requests are simply not routable by prefix.
        _encode(repr(item), out)
    elif isinstance(item, int):
        out += b"i" + struct.pack("<q", item)
    else:
        out += b"t" + struct.pack("<I", len(item))
        for x in item:
            _encode(x, out)


def block_key(parent, tokens, extras):
    """Key of one block: `parent` is the previous block's key (None for the first)."""
    buf = bytearray(_DOMAIN)
    buf += parent or _ROOT
    buf += struct.pack("<I%dI" % len(tokens), len(tokens), *tokens)
    extras = extras or ()
    buf += struct.pack("<I", len(extras))
    for e in extras:
        _encode(e, buf)
    return hashlib.sha256(buf).digest()


def block_keys(tokens, block_size, extras=lambda i: None, parent=None, first=0):
    """Keys of the full blocks of `tokens`, chained from `parent`; `extras(i)` gives block
    `first + i`'s extra keys."""
    keys = []
    for i in range(len(tokens) // block_size):
        parent = block_key(parent, tokens[i * block_size : (i + 1) * block_size], extras(first + i))
        keys.append(parent)
    return keys


def request_keys(tokens, block_size, cache_salt=""):
    """Keys of a plain request: the salt, if any, on the first block (as vLLM adds it)."""
    return block_keys(tokens, block_size, lambda i: (("cache_salt", cache_salt),) if i == 0 and cache_salt else None)
