"""What both halves of the connector share: settings, the metadata the scheduler hands the
workers, stats, and the connection to kvtierd with reconnect and backoff."""

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from ..client import Client, KvTierError, default_socket, is_socket, socket_candidates
from ..keys import block_keys

try:
    from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys as _extra_keys
except ImportError:  # an older vLLM: the salt is the only extra key it had
    _extra_keys = None

# The namespace's `hash_algo`: how blocks are keyed (docs/keying.md).
KEYING = "kvtier-block-v1"

# Under vLLM's logger so its handlers and levels apply.
logger = logging.getLogger("vllm.kvtier")

_MAX_BACKOFF_S = 5.0
# A daemon that accepts but does not answer (stopped, stuck): not asked again for this long, so
# the engine pays one short timeout per period instead of one per request.
_STUCK_BACKOFF_S = 30.0
# The scheduler's lookup is answered in well under a millisecond by a live daemon; it waits no
# longer than this (vLLM's scheduling loop is blocked meanwhile).
LOOKUP_TIMEOUT_S = 1.0
# Bytes one daemon-side save request copies at most by default (`save_piece_bytes`).
_SAVE_PIECE_BYTES = 32 << 20
# Bytes a P/D decode pulls per request (`pull_piece_bytes`; 0: the whole prompt at once). Each
# piece is loaded while the next is pulled, which hides a long prompt's load behind its pull where
# the two use different resources (a NIC and a PCIe copy engine); on a 2-vCPU VM, where both are
# CPU copies, it measured no faster, so it is off by default.
_PULL_PIECE_BYTES = 0


@dataclass
class Settings:
    """The connector's configuration: vLLM's and `kv_connector_extra_config`'s."""

    socket_path: str
    name: str
    block_size: int
    num_blocks: Optional[int]
    descriptor: dict
    block_bytes: int
    # Prefill/decode: a prefill instance names its daemon's TransferService address here and
    # hands it to the decode request (kv_transfer_params); the decode instance's daemon pulls
    # the prompt's blocks from there before the lookup.
    transfer_source: Optional[str]
    device_copy: bool
    save_piece_bytes: int
    pull_piece_bytes: int
    # Where this engine serves its OpenAI API ("host:port"), announced to the daemon so that
    # `kvtier gateway` can route to it by its node's blocks; None: not announced.
    engine_address: Optional[str] = None
    served_models: list = field(default_factory=list)

    @classmethod
    def of(cls, vllm_config, role, kv_cache_config, extra):
        descriptor, block_bytes = _namespace_descriptor(vllm_config, kv_cache_config)
        return cls(
            socket_path=extra.get("socket") or default_socket(),
            name=f"vllm-{role.name.lower()}-{os.getpid()}",
            block_size=vllm_config.cache_config.block_size,
            num_blocks=getattr(kv_cache_config, "num_blocks", None),
            descriptor=descriptor,
            block_bytes=block_bytes,
            transfer_source=extra.get("transfer_source"),
            device_copy=extra.get("device_copy", "auto") != "off",
            save_piece_bytes=int(extra.get("save_piece_bytes", _SAVE_PIECE_BYTES)),
            pull_piece_bytes=int(extra.get("pull_piece_bytes", _PULL_PIECE_BYTES)),
            engine_address=extra.get("engine_address") or os.environ.get("KVTIER_ENGINE_ADDRESS") or None,
            served_models=_served_models(vllm_config.model_config),
        )

    def engine(self):
        """`(address, served models)` to announce, or None."""
        return (self.engine_address, self.served_models) if self.engine_address else None


# -- metadata passed from the scheduler to the workers ---------------------------------------


@dataclass
class Transfer:
    """Blocks of one request to move: vLLM block ids and the matching block hashes."""

    req_id: str
    cache_salt: str
    block_ids: list
    hashes: list
    # P/D decode side: the prefill daemon to pull the blocks from first; such a load runs in the
    # background and is reported through get_finished (vLLM's asynchronous load).
    source: Optional[str] = None
    # Worker side, GPU engines: the event recorded on the engine's stream after the forward pass
    # that wrote the blocks; the saver thread waits for it.
    written: Optional[object] = None


@dataclass
class KvTierMetadata(KVConnectorMetadata):
    """What the workers do this step."""

    loads: list = field(default_factory=list)
    saves: list = field(default_factory=list)
    preempted: set = field(default_factory=set)


# -- stats ------------------------------------------------------------------------------------


@dataclass
class KvTierStats(KVConnectorStats):
    """Tokens matched, loaded and saved, blocks that failed to load, blocks pulled from a
    prefill instance's daemon (P/D), and calls the daemon did not answer in time, per interval."""

    def __post_init__(self):
        for k in ("matched_tokens", "loaded_tokens", "saved_tokens", "load_errors", "pulled_blocks", "pull_errors",
                  "daemon_copied_blocks", "daemon_copy_errors", "daemon_timeouts"):
            self.data.setdefault(k, 0)

    def reset(self):
        for k in self.data:
            self.data[k] = 0

    def aggregate(self, other):
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self):
        return dict(self.data)

    def is_empty(self):
        return not any(self.data.values())


class Counters:
    """This interval's stats (taken by vLLM) and the totals since start, written to
    `stats_file` (if configured) as they change."""

    def __init__(self, stats_file, role_name):
        self._lock = threading.Lock()
        self._stats = KvTierStats()
        self._totals = KvTierStats()
        self._path = f"{stats_file}.{role_name}" if stats_file else None

    def count(self, key, n):
        with self._lock:
            self._stats.data[key] += n
            self._totals.data[key] += n
            if self._path and n:
                with open(self._path + ".tmp", "w") as f:
                    json.dump(self._totals.data, f)
                os.replace(self._path + ".tmp", self._path)

    def take(self):
        """This interval's stats (None if nothing happened); starts a new interval."""
        with self._lock:
            if self._stats.is_empty():
                return None
            out, self._stats = self._stats, KvTierStats()
            return out


# -- connection with reconnect and backoff ----------------------------------------------------


class Daemon:
    """A lazily (re)connected client. `get()` returns None while the daemon is unavailable."""

    def __init__(self, socket_path, name, descriptor, on_timeout=lambda: None, engine=None):
        self.socket_path = socket_path
        self.engine = engine  # announced in Hello (the scheduler side only)
        self.on_timeout = on_timeout  # called for each call the daemon did not answer in time
        self.name = name
        self.descriptor = descriptor
        self.client = None
        self.namespaces = {}
        self.kv_caches = {}  # salt -> the daemon's id of our registered KV cache, or None
        # The loading (main) and saving threads register namespaces and KV caches on first use.
        self.registering = threading.Lock()
        self.retry_at = 0.0
        self.backoff = 0.1
        self.down_logged = False

    def get(self):
        if self.client is not None:
            return self.client
        if time.monotonic() < self.retry_at:
            return None
        try:
            self.client = Client(self.socket_path, name=self.name, timeout=10.0, engine=self.engine)
        except (OSError, KvTierError) as e:
            self.fail(e)
            return None
        if self.down_logged:
            logger.info("kvtier: reconnected to kvtierd at %s", self.socket_path)
        logger.debug(
            "kvtier: daemon device backend %r (daemon-side copies offered: %s)",
            self.client.hello.device_backend or "host",
            self.client.hello.device_dma,
        )
        self.down_logged = False
        self.backoff = 0.1
        return self.client

    def namespace(self, salt):
        client = self.get()
        if client is None:
            return None, None
        with self.registering:
            ns = self.namespaces.get(salt)
            if ns is None:
                ns = self.namespaces[salt] = client.register(dict(self.descriptor, cache_salt=salt or ""))
            return client, ns

    def kv_cache(self, salt, layout):
        """`(client, namespace, cache)`: `cache` is the daemon's id of our KV tensors registered
        for daemon-side copies, or None when the connector copies (no layout, not offered, or
        refused: the refusal is logged once per connection)."""
        client, ns = self.namespace(salt)
        if client is None or layout is None or not client.hello.device_dma:
            return client, ns, None
        with self.registering:
            known = self.kv_caches.get(salt, False)  # a cache id, or None: refused
            if known is not False:
                return client, ns, known
            cache, error = client.register_kv_cache(ns, **layout)
            if error:
                logger.warning("kvtier: kvtierd cannot copy this engine's KV memory (%s); copying through the pool",
                               error)
                cache = None
            self.kv_caches[salt] = cache
            return client, ns, cache

    def fail(self, error):
        if self.client is not None:
            self.client.close()
        self.client = None
        self.namespaces = {}
        self.kv_caches = {}
        stuck = isinstance(error, TimeoutError)
        if stuck:
            self.on_timeout()
        self.retry_at = time.monotonic() + (_STUCK_BACKOFF_S if stuck else self.backoff)
        self.backoff = min(self.backoff * 2, _MAX_BACKOFF_S)
        if not self.down_logged or stuck:
            logger.warning(
                "kvtier: kvtierd %s at %s (%s); running without it, retrying in %.1f s",
                "not answering" if stuck else "unavailable",
                self.socket_path,
                error,
                self.retry_at - time.monotonic(),
            )
            self.down_logged = True


# -- helpers ---------------------------------------------------------------------------------


def _namespace_descriptor(vllm_config, kv_cache_config):
    """The namespace fields from vLLM's configuration, and the bytes of one block."""
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    spec, num_layers = None, 0
    if kv_cache_config is not None and kv_cache_config.kv_cache_groups:
        groups = kv_cache_config.kv_cache_groups
        if len(groups) > 1:
            # vLLM turns its hybrid allocator off for connectors that do not declare support for
            # it (every layer then gets full blocks under one block table); several groups here
            # would mean per-group block tables this connector does not follow.
            kinds = ", ".join(type(g.kv_cache_spec).__name__ for g in groups)
            raise NotImplementedError(
                f"kvtier: a hybrid KV cache with {len(groups)} groups ({kinds}) is not supported; "
                "run vLLM with --disable-hybrid-kv-cache-manager"
            )
        group = groups[0]
        spec, num_layers = group.kv_cache_spec, len(group.layer_names)
    kv_heads = getattr(spec, "num_kv_heads", None) or mc.get_num_kv_heads(pc)
    head_size = getattr(spec, "head_size", None) or mc.get_head_size()
    dtype = getattr(spec, "dtype", None) or mc.dtype
    block_bytes = spec.page_size_bytes * num_layers if spec is not None else 0
    desc = {
        "model": str(mc.model),
        "revision": str(mc.revision or ""),
        "kv_dtype": str(dtype).replace("torch.", ""),
        "tokens_per_block": cc.block_size,
        "num_layers": num_layers,
        "kv_heads": kv_heads,
        "head_size": head_size,
        "layout": "vllm-v1-per-layer",
        "tp_rank": _rank(pc, "tp"),
        "tp_size": pc.tensor_parallel_size,
        "pp_rank": _rank(pc, "pp"),
        "pp_size": pc.pipeline_parallel_size,
        # Blocks are keyed by kvtier.keys, whatever vLLM's own hash algorithm and seed.
        "hash_algo": KEYING,
        "hash_seed": "",
        "block_bytes": block_bytes,
    }
    return desc, block_bytes


def _served_models(mc):
    names = getattr(mc, "served_model_name", None) or mc.model
    return [str(n) for n in ([names] if isinstance(names, str) else names)][:16]


def _rank(pc, kind):
    try:
        from vllm.distributed import parallel_state

        group = parallel_state.get_tp_group() if kind == "tp" else parallel_state.get_pp_group()
        return group.rank_in_group
    except Exception:  # the scheduler process has no groups: rank 0 speaks for all
        return 0


def prompt_keys(request, block_size):
    """The kvtier keys (`kvtier.keys`) of the full blocks of a request's prompt, with vLLM's
    per-block extra keys (LoRA adapter, multimodal items, cache salt, prompt embeddings) so that
    blocks whose KV differs never share a key. Empty for a prompt given as embeddings only."""
    tokens = request.prompt_token_ids
    if not tokens:
        return []
    mm = [0]

    def extras(i):
        if _extra_keys is None:
            return (("cache_salt", request.cache_salt),) if i == 0 and request.cache_salt else None
        found, mm[0] = _extra_keys(request, i * block_size, (i + 1) * block_size, mm[0])
        return found

    return block_keys(tokens, block_size, extras)


def warn_if_cpu_threads_shift(role, device_type):
    """Says once, from the scheduler, that vLLM's CPU build gives an engine with a KV connector
    one OpenMP thread fewer than the same engine without one (it reserves a core for NIXL), so
    bf16 outputs differ slightly from an engine without the connector unless the reservation is
    pinned (docs/vllm.md, "Exactness")."""
    if role != "SCHEDULER" or device_type != "cpu" or "VLLM_CPU_NUM_OF_RESERVED_CPU" in os.environ:
        return
    logger.warning(
        "kvtier: vLLM's CPU build reserves one more core for any KV connector, so this engine's "
        "worker runs one OpenMP thread fewer than without the connector and its bf16 outputs can "
        "differ slightly from such an engine's. The connector needs no core of its own: to compare "
        "with an engine without it, set VLLM_CPU_NUM_OF_RESERVED_CPU to the same value for both "
        "(vLLM reserves one core per local worker without a connector)."
    )


def warn_if_no_daemon(socket_path, explicit):
    """Says loudly, once at start, that no daemon listens where the connector will connect: the
    engine then serves uncached (and keeps retrying), which is easy to miss otherwise."""
    if is_socket(socket_path):
        return
    looked = socket_path if explicit else ", ".join(socket_candidates())
    logger.warning(
        "kvtier: no kvtierd listening at %s (looked at: %s); this engine runs WITHOUT the KV cache "
        "until one does. Start kvtierd, or point the connector at its socket "
        "(kv_connector_extra_config {\"socket\": PATH} or KVTIER_SOCKET).",
        socket_path,
        looked,
    )
