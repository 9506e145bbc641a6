"""`KvTierConnector`: a vLLM v1 KV connector that saves prompt KV blocks to kvtierd and loads the
longest held prefix back.

Enable it in stock vLLM with:

    --kv-transfer-config '{"kv_connector":"KvTierConnector","kv_connector_module_path":"kvtier.vllm",
                           "kv_role":"kv_both","kv_connector_extra_config":{"socket":"/path/kvtierd.sock"}}'

Scheduler side: asks the daemon how many leading blocks of a request it holds (`Lookup` on the
request's own `block_hashes`), plans loads into the blocks vLLM allocates, and plans a save of the
prompt's full blocks in the step that finishes its prefill. Worker side: loads synchronously before
the forward pass (acquire, copy from the shared pool into the KV cache, release); saves run on a
background thread after the forward pass (reserve, copy, commit), and the request's blocks are held
until the save is reported finished. Copies go through the pool mapping received over the socket,
so they work for CPU tensors (and GPU tensors through torch). When the daemon offers daemon-side
copies (`device_dma`, backends "cma" and "cuda") and the KV tensors are contiguous host memory or
CUDA memory (registered by IPC handle), the connector registers them once and each save or load is
one request: the daemon copies every layer of every block itself (`SaveKv` / `LoadKv`); on a GPU
the copies are ordered with the forward's stream by interprocess events, so no engine thread waits
for them. Any refusal or failed copy falls back to copying through the pool. `"device_copy": "off"` in kv_connector_extra_config keeps the connector copying;
saves go in requests of at most `"save_piece_bytes"` (32 MiB), so a load waits for one at most.
With `"pull_piece_bytes"` set, a P/D decode pulls its prompt in pieces of that size and loads
each piece while the next one is pulled (default 0: one pull, then one load).

Failure never costs correctness: a daemon that is absent, killed or restarted means zero matched
tokens, or blocks reported through `get_block_ids_with_load_errors` (vLLM recomputes them). The
connection is retried with backoff and an outage is logged once.
"""

import concurrent.futures
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from .client import Client, KvTierError, default_socket
from .layout import block_dim as _block_dim, block_slice as _block_slice, dma_layout as _dma_layout

# Under vLLM's logger so its handlers and levels apply.
logger = logging.getLogger("vllm.kvtier")

_MAX_BACKOFF_S = 5.0
# A daemon that accepts but does not answer (stopped, stuck): not asked again for this long, so
# the engine pays one short timeout per period instead of one per request.
_STUCK_BACKOFF_S = 30.0
# The scheduler's lookup is answered in well under a millisecond by a live daemon; it waits no
# longer than this (vLLM's scheduling loop is blocked meanwhile).
_LOOKUP_TIMEOUT_S = 1.0
# Bytes one daemon-side save request copies at most by default (`save_piece_bytes`).
_SAVE_PIECE_BYTES = 32 << 20
# Bytes a P/D decode pulls per request (`pull_piece_bytes`; 0: the whole prompt at once). Each
# piece is loaded while the next is pulled, which hides a long prompt's load behind its pull where
# the two use different resources (a NIC and a PCIe copy engine); on a 2-vCPU VM, where both are
# CPU copies, it measured no faster, so it is off by default.
_PULL_PIECE_BYTES = 0


# -- metadata passed from the scheduler to the workers ---------------------------------------


@dataclass
class _Transfer:
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


# -- connection with reconnect and backoff ----------------------------------------------------


class _Daemon:
    """A lazily (re)connected client. `get()` returns None while the daemon is unavailable."""

    def __init__(self, socket_path, name, descriptor, on_timeout=lambda: None):
        self.socket_path = socket_path
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
            self.client = Client(self.socket_path, name=self.name, timeout=10.0)
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


# -- the connector ----------------------------------------------------------------------------


class KvTierConnector(KVConnectorBase_V1):
    """vLLM v1 connector backed by kvtierd's host tier."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self._block_size = vllm_config.cache_config.block_size
        self._num_blocks = getattr(kv_cache_config, "num_blocks", None)
        socket_path = extra.get("socket") or default_socket()
        self._descriptor, block_bytes = _namespace_descriptor(vllm_config, kv_cache_config)
        self._block_bytes = block_bytes
        name = f"vllm-{role.name.lower()}-{os.getpid()}"
        self._daemon = _Daemon(socket_path, name, self._descriptor, self._daemon_timed_out)
        self._stats = KvTierStats()
        # Totals since start, written to `stats_file` (if configured) as they change.
        self._totals = KvTierStats()
        self._stats_file = extra.get("stats_file")
        # Prefill/decode: a prefill instance names its daemon's TransferService address here and
        # hands it to the decode request (kv_transfer_params); the decode instance's daemon pulls
        # the prompt's blocks from there before the lookup.
        self._transfer_source = extra.get("transfer_source")
        self._device_copy = extra.get("device_copy", "auto") != "off"
        self._save_piece_bytes = int(extra.get("save_piece_bytes", _SAVE_PIECE_BYTES))
        self._pull_piece_bytes = int(extra.get("pull_piece_bytes", _PULL_PIECE_BYTES))
        self._dma_layout = None  # set by register_kv_caches when the daemon may copy
        self._events = None  # GPU engines with daemon-side copies: cuda.StreamEvents
        self._pulled = set()
        self._stats_lock = threading.Lock()
        _warn_if_hashes_are_private(vllm_config)
        if getattr(self._kv_transfer_config, "kv_load_failure_policy", "recompute") != "recompute":
            # A cache miss is never an error: blocks that fail to load are recomputed.
            self._kv_transfer_config.kv_load_failure_policy = "recompute"
        if role == KVConnectorRole.SCHEDULER:
            self._requests = {}  # req_id -> Request (while scheduled)
            self._local = {}  # req_id -> tokens computed locally (engine prefix cache)
            self._block_ids = {}  # req_id -> block ids allocated so far
            self._pending_loads = {}  # req_id -> _Transfer, planned in update_state_after_alloc
            self._prefilled = set()  # req ids whose prompt save was planned
            self._saving = set()  # req ids with a save not yet reported finished
            self._pulling = {}  # req_id -> prefill daemon, for P/D loads not yet planned
            self._loading = set()  # req ids with an asynchronous (P/D) load not yet reported done
        else:
            self._layers = []  # [(name, tensor, block_dim)]
            self._load_errors = set()
            self._saves = queue.Queue()
            self._saves_done = set()
            self._finished = set()
            self._lock = threading.Lock()
            self._inflight = 0
            self._idle = threading.Condition(self._lock)
            self._saver = threading.Thread(target=self._save_loop, name="kvtier-save", daemon=True)
            self._saver.start()
            # P/D loads: pulled and loaded in the background over a connection of their own, so
            # that a long pull never holds up this worker's other loads and saves.
            self._puller = _Daemon(socket_path, name + "-pull", self._descriptor, self._daemon_timed_out)
            self._pulls = queue.Queue()
            self._pulls_done = set()
            self._pull_thread = threading.Thread(target=self._pull_loop, name="kvtier-pull", daemon=True)
            self._pull_thread.start()
            # Pieces of a prompt pulled in pieces (`pull_piece_bytes`) load over yet another
            # connection while the next one is pulled; the last loads over the pull's own.
            self._piece_loader = _Daemon(socket_path, name + "-pd-load", self._descriptor, self._daemon_timed_out)
            self._piece_loads = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvtier-pd-load")

    @property
    def requires_kv_delivery(self):
        # A best-effort cache: a dropped save is just a future cache miss.
        return False

    def _daemon_timed_out(self):
        self._count("daemon_timeouts", 1)

    def _count(self, key, n):
        with self._stats_lock:
            self._stats.data[key] += n
            self._totals.data[key] += n
            if self._stats_file and n:
                self._write_totals()

    def _write_totals(self):
        path = f"{self._stats_file}.{self._role.name.lower()}"
        with open(path + ".tmp", "w") as f:
            json.dump(self._totals.data, f)
        os.replace(path + ".tmp", path)

    # ---------------------------------------------------------------- scheduler side

    def _loadable_blocks(self, request):
        # At least one prompt token must be computed by the model to produce logits.
        n_prompt = len(request.prompt_token_ids or [])
        return min(len(request.block_hashes), max(n_prompt - 1, 0) // self._block_size)

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        self._requests[request.request_id] = request
        self._local[request.request_id] = num_computed_tokens
        n = self._loadable_blocks(request)
        first = num_computed_tokens // self._block_size
        if n <= first:
            return 0, False
        source = self._prefill_source(request)
        if source is not None:
            # Decode side of P/D: the worker pulls the prompt from the prefill daemon and loads
            # it in the background; vLLM schedules other requests meanwhile (and recomputes
            # whatever does not arrive).
            self._pulling[request.request_id] = source
            return (n - first) * self._block_size, True
        try:
            client, ns = self._daemon.namespace(request.cache_salt)
            if client is None:
                return 0, False
            # Blocks only on disk start moving into the pool now, while vLLM schedules; the
            # worker's load finds them there (or waits for the rest).
            hashes = [bytes(h) for h in request.block_hashes[:n]]
            matched, _ = client.lookup_and_prefetch(ns, hashes, timeout=_LOOKUP_TIMEOUT_S)
        except (OSError, KvTierError) as e:
            self._daemon.fail(e)
            return 0, False
        return max(0, matched * self._block_size - num_computed_tokens), False

    def _prefill_source(self, request):
        """The prefill daemon to pull `request`'s prompt from (P/D decode side), until its load
        is planned; None otherwise."""
        if request.request_id in self._pulling:
            return self._pulling[request.request_id]
        if request.request_id in self._pulled:
            return None
        params = getattr(request, "kv_transfer_params", None) or {}
        source = params.get("kvtier_source")
        if source:
            self._pulled.add(request.request_id)
        return source or None

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        self._requests[request.request_id] = request
        if num_external_tokens <= 0:
            return
        # Counted here, once per request (the lookup may be asked more than once).
        self._count("matched_tokens", num_external_tokens)
        block_ids = blocks.get_block_ids()[0]
        first = self._local.get(request.request_id, 0) // self._block_size
        last = first + num_external_tokens // self._block_size
        hashes = [bytes(h) for h in request.block_hashes[first:last]]
        source = self._pulling.pop(request.request_id, None)
        if source is not None:
            self._loading.add(request.request_id)
        self._pending_loads[request.request_id] = _Transfer(
            request.request_id, request.cache_salt or "", list(block_ids[first:last]), hashes, source
        )

    def build_connector_meta(self, scheduler_output):
        meta = KvTierMetadata(loads=list(self._pending_loads.values()))
        self._pending_loads.clear()
        meta.preempted = set(scheduler_output.preempted_req_ids or ())
        for new in scheduler_output.scheduled_new_reqs:
            self._block_ids[new.req_id] = list(new.block_ids[0])
            self._plan_save(meta, new.req_id, new.num_computed_tokens, scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                self._block_ids[req_id] = list(new_ids[0]) if new_ids else []
                self._prefilled.discard(req_id)
            elif new_ids:
                self._block_ids.setdefault(req_id, []).extend(new_ids[0])
            self._plan_save(meta, req_id, cached.num_computed_tokens[i], scheduler_output)
        for req_id in scheduler_output.finished_req_ids:
            self._forget(req_id)
        return meta

    def _plan_save(self, meta, req_id, num_computed, scheduler_output):
        """Plans the save of a prompt's full blocks in the step that completes its prefill."""
        request = self._requests.get(req_id)
        if request is None or req_id in self._prefilled:
            return
        n_prompt = len(request.prompt_token_ids or [])
        if num_computed + scheduler_output.num_scheduled_tokens.get(req_id, 0) < n_prompt:
            return
        self._prefilled.add(req_id)
        n = min(len(request.block_hashes), n_prompt // self._block_size, len(self._block_ids.get(req_id, [])))
        if n == 0:
            return
        hashes = [bytes(h) for h in request.block_hashes[:n]]
        meta.saves.append(_Transfer(req_id, request.cache_salt or "", self._block_ids[req_id][:n], hashes))
        self._saving.add(req_id)

    def _forget(self, req_id):
        self._pulling.pop(req_id, None)
        self._requests.pop(req_id, None)
        self._local.pop(req_id, None)
        self._block_ids.pop(req_id, None)
        self._prefilled.discard(req_id)

    def update_connector_output(self, connector_output):
        for req_id in connector_output.finished_sending or ():
            self._saving.discard(req_id)
        for req_id in connector_output.finished_recving or ():
            self._loading.discard(req_id)

    def request_finished(self, request, block_ids):
        self._pulled.discard(request.request_id)
        # Prefill side of P/D: tell the decode request where to pull this prompt's blocks from.
        params = {"kvtier_source": self._transfer_source} if self._transfer_source else None
        # Hold the blocks while their save may still be reading them, or a P/D load writing them.
        held = request.request_id in self._saving or request.request_id in self._loading
        return held, params

    # ---------------------------------------------------------------- worker side

    def register_kv_caches(self, kv_caches):
        layers = []
        for name in sorted(kv_caches):
            t = kv_caches[name]
            if isinstance(t, (list, tuple)):
                raise NotImplementedError("kvtier: per-layer KV given as a list is not supported yet")
            layers.append((name, t, _block_dim(t, self._num_blocks)))
        per_block = sum(_block_slice(t, d, 0).numel() * t.element_size() for _, t, d in layers)
        if per_block != self._block_bytes:
            logger.warning("kvtier: KV tensors hold %d bytes per block, config says %d; using %d",
                           per_block, self._block_bytes, per_block)
            self._block_bytes = per_block
            self._daemon.descriptor = dict(self._descriptor, block_bytes=per_block)
            self._puller.descriptor = self._daemon.descriptor
        self._layers = layers
        self._dma_layout = _dma_layout(layers) if self._device_copy else None
        if self._dma_layout and layers[0][1].device.type == "cuda":
            from .cuda import StreamEvents

            self._events = StreamEvents(layers[0][1].device)
        logger.info("kvtier: %d KV layers, %d bytes per block, daemon at %s%s",
                    len(layers), per_block, self._daemon.socket_path,
                    "" if self._dma_layout else " (the connector copies)")

    def _copy_block(self, view, block_id, to_pool):
        """Copies one block between the KV cache (all layers) and a pool slot's memoryview."""
        pool = torch.frombuffer(view, dtype=torch.uint8)
        off = 0
        for _, t, dim in self._layers:
            src = _block_slice(t, dim, block_id)
            n = src.numel() * t.element_size()
            slot = pool[off : off + n].view(t.dtype).view(src.shape)
            if to_pool:
                slot.copy_(src)
            else:
                src.copy_(slot)
            off += n

    def start_load_kv(self, forward_context, **kwargs):
        meta = self._get_connector_metadata()
        for job in meta.loads:
            if job.source is not None:
                self._pulls.put(job)
            else:
                self._load(self._daemon, job, on_engine_stream=True)

    def _load(self, daemon, job, on_engine_stream=False):
        """Loads `job`'s held prefix into its blocks over `daemon`'s connection; the rest is
        reported as load errors (vLLM recomputes them). `on_engine_stream` (the thread that runs
        the forward pass): a GPU copy is ordered with this thread's stream by events, and no CPU
        thread waits for it."""
        self._report_load(job, self._load_blocks(daemon, job, on_engine_stream))

    def _load_blocks(self, daemon, job, on_engine_stream=False):
        """Loads `job`'s held prefix into its blocks; returns how many blocks were loaded."""
        try:
            client, ns, cache = daemon.kv_cache(job.cache_salt, self._dma_layout)
            if client is None:
                return 0
            loaded = self._daemon_copy(client, cache, job, save=False, on_engine_stream=on_engine_stream)
            return self._load_by_copy(client, ns, job) if loaded is None else loaded
        except (OSError, KvTierError) as e:
            daemon.fail(e)
            return 0

    def _report_load(self, job, loaded):
        """Counts `loaded` blocks of `job` as loaded and reports the rest as load errors."""
        failed = job.block_ids[loaded:]
        with self._lock:
            self._load_errors.update(failed)
        self._count("loaded_tokens", loaded * self._block_size)
        self._count("load_errors", len(failed))
        if failed:
            logger.debug("kvtier: %d of %d blocks of %s not loaded; vLLM recomputes them",
                         len(failed), len(job.block_ids), job.req_id)

    def _pull_loop(self):
        while True:
            job = self._pulls.get()
            if job is None:
                return
            try:
                self._pull(job)
            except Exception as e:  # never let the engine fail because of us
                logger.warning("kvtier: P/D load of %s failed (recomputing): %r", job.req_id, e)
                with self._lock:
                    self._load_errors.update(job.block_ids)
            finally:
                # Load errors first, then done: vLLM sees both in the same step at the latest.
                with self._lock:
                    self._pulls_done.add(job.req_id)

    def _pull(self, job):
        """Decode side of P/D: has our daemon pull `job`'s blocks from the prefill daemon (in
        pieces of about `pull_piece_bytes` if set, each loaded over a connection of its own while
        the next one is pulled), then loads what the last pull brought. What loaded from the
        start on counts; the rest is recomputed."""
        whole = self._pull_piece_bytes <= 0
        step = max(1, len(job.hashes) if whole else self._pull_piece_bytes // max(self._block_bytes, 1))
        loads, pulled, error = [], 0, ""  # loads: (blocks held, future of blocks loaded)
        try:
            for at in range(0, len(job.hashes), step):
                piece = _Transfer(job.req_id, job.cache_salt, job.block_ids[at : at + step], job.hashes[at : at + step])
                new, present, error = self._pull_piece(job.source, piece, job.hashes[at - 1] if at else None)
                pulled, held = pulled + new, new + present
                last = error or held < len(piece.hashes) or at + step >= len(job.hashes)
                piece.block_ids, piece.hashes = piece.block_ids[:held], piece.hashes[:held]
                if last:
                    # Nothing more to pull: this piece loads here, over the pull's connection.
                    done = concurrent.futures.Future()
                    done.set_result(self._load_blocks(self._puller, piece) if held else 0)
                    loads.append((held, done))
                    break
                loads.append((held, self._piece_loads.submit(self._load_blocks, self._piece_loader, piece)))
        finally:
            # Every load must be over before any block is reported failed: vLLM recomputes into
            # a failed block, and a late load must not write over that.
            concurrent.futures.wait([load for _, load in loads])
        if error:
            logger.warning("kvtier: pulling request %s from %s failed (recomputing): %s",
                           job.req_id, job.source, error)
            self._count("pull_errors", 1)
        self._count("pulled_blocks", pulled)
        loaded = 0
        for held, load in loads:
            done = load.result() if load.exception() is None else 0
            loaded += done
            if done < held:
                break
        self._report_load(job, loaded)

    def _pull_piece(self, source, piece, parent):
        """Has our daemon pull `piece` (continuing `parent`); returns `(pulled, present, error)`."""
        try:
            client, ns = self._puller.namespace(piece.cache_salt)
            if client is None:
                return 0, 0, "kvtierd unavailable"
            return client.pull(ns, source, piece.hashes, parent)
        except (OSError, KvTierError) as e:
            self._puller.fail(e)
            return 0, 0, repr(e)

    def _daemon_copy(self, client, cache, job, save, on_engine_stream=False):
        """Has the daemon save or load `job` if our KV cache is registered with it (`cache` not
        None); returns the blocks moved, or None if not tried or failed: the connector copies."""
        if cache is None:
            return None
        if save:
            blocks, error = self._save_in_pieces(client, cache, job)
        else:
            blocks, error = self._load_by_daemon(client, cache, job, on_engine_stream)
        self._count("daemon_copied_blocks", blocks)  # a failed save may have committed pieces
        if error:
            logger.debug("kvtier: daemon-side %s of %s failed (copying instead): %s",
                         "save" if save else "load", job.req_id, error)
            self._count("daemon_copy_errors", 1)
            return None
        return blocks

    def _load_by_daemon(self, client, cache, job, on_engine_stream):
        """LoadKv; on a GPU behind an event of this thread's stream. On the engine's stream the
        reply comes once the copy is queued and the stream waits for the daemon's event; elsewhere
        the reply comes once it is done. Returns `(blocks loaded, error)`."""
        if self._events is None:
            reply = client.load_kv(cache, job.hashes, job.block_ids)
            return reply.loaded, reply.error
        free = self._events.mark()  # the blocks' previous readers are done
        reply = client.load_kv(cache, job.hashes, job.block_ids, wait_event=free, return_event=on_engine_stream)
        if reply.done_event:
            self._events.wait(reply.done_event)
        return reply.loaded, reply.error

    def _save_in_pieces(self, client, cache, job):
        """SaveKv in pieces of about `save_piece_bytes`: loads share this connection, and one
        waits for at most one piece of a long save. Returns `(blocks saved, error)`."""
        step = max(1, self._save_piece_bytes // max(self._block_bytes, 1))
        saved = 0
        for at in range(0, len(job.hashes), step):
            parent = job.hashes[at - 1] if at else None
            reply = client.save_kv(cache, job.hashes[at : at + step], job.block_ids[at : at + step], parent)
            if reply.error:
                return saved, reply.error
            saved += reply.saved
        return saved, ""

    def _load_by_copy(self, client, ns, job):
        """Loads the held prefix of `job` through the client's mapping (the pool, or its staging
        window, a window-full at a time); returns the blocks loaded."""
        step = client.blocks_at_once(self._block_bytes)
        loaded = 0
        for at in range(0, len(job.hashes), step):
            lease, slots = client.acquire(ns, job.hashes[at : at + step])
            try:
                for block_id, slot in zip(job.block_ids[at : at + step], slots):
                    self._copy_block(client.view(slot, self._block_bytes), block_id, to_pool=False)
                    loaded += 1
            finally:
                if lease:
                    client.release(lease)
            if len(slots) < len(job.hashes[at : at + step]):
                break
        return loaded

    def wait_for_layer_load(self, layer_name):
        return

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        return

    def wait_for_save(self):
        # The forward pass of this step is done: hand this step's saves to the saver thread.
        meta = self._get_connector_metadata()
        written = self._events.record() if self._events is not None and meta.saves else None
        for job in meta.saves:
            job.written = written
            with self._lock:
                self._inflight += 1
            self._saves.put(job)

    def handle_preemptions(self, kv_connector_metadata):
        # Preempted requests' blocks are about to be reused: let in-flight saves finish first.
        if getattr(kv_connector_metadata, "preempted", None):
            self._wait_idle()

    def _wait_idle(self, timeout=None):
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)

    def _save_loop(self):
        while True:
            job = self._saves.get()
            if job is None:
                return
            try:
                self._save(job)
            finally:
                with self._idle:
                    self._inflight -= 1
                    self._saves_done.add(job.req_id)
                    self._idle.notify_all()

    def _save(self, job):
        try:
            client, ns, cache = self._daemon.kv_cache(job.cache_salt, self._dma_layout)
            if client is None:
                return
            if job.written is not None:
                # This (saver) thread waits for the forward pass that wrote the blocks, not the
                # engine's: a save is sent only for blocks known written. (Handing the daemon the
                # event instead could let an engine killed mid-step have it fire without them.)
                job.written.synchronize()
            saved = self._daemon_copy(client, cache, job, save=True)
            if saved is None:
                saved = self._save_by_copy(client, ns, job)
            self._count("saved_tokens", saved * self._block_size)
        except (OSError, KvTierError) as e:
            self._daemon.fail(e)

    def _save_by_copy(self, client, ns, job):
        """Saves `job` through the client's mapping (reserve, copy, commit; through a staging
        window a window-full at a time); returns the blocks stored."""
        step = client.blocks_at_once(self._block_bytes)
        stored = 0
        for at in range(0, len(job.hashes), step):
            parent = job.hashes[at - 1] if at else None
            reservation, outcomes = client.reserve(ns, job.hashes[at : at + step], parent)
            try:
                for block_id, outcome in zip(job.block_ids[at : at + step], outcomes):
                    if not isinstance(outcome, str):
                        self._copy_block(client.view(outcome, self._block_bytes), block_id, to_pool=True)
                        stored += 1
            except BaseException:
                if reservation:
                    client.abort(reservation)
                raise
            if reservation:
                client.commit(reservation)
            if "no_space" in outcomes:
                break
        return stored

    def get_finished(self, finished_req_ids):
        with self._lock:
            self._finished.update(finished_req_ids)
            done = self._finished & self._saves_done
            self._finished -= done
            self._saves_done -= done
            received, self._pulls_done = self._pulls_done, set()
        return (done or None), (received or None)

    def get_block_ids_with_load_errors(self):
        with self._lock:
            errors, self._load_errors = self._load_errors, set()
        return errors

    def get_kv_connector_stats(self):
        with self._stats_lock:
            if self._stats.is_empty():
                return None
            out, self._stats = self._stats, KvTierStats()
            return out

    @classmethod
    def build_kv_connector_stats(cls, data=None):
        return KvTierStats(data=data) if data is not None else KvTierStats()

    def shutdown(self):
        if self._role != KVConnectorRole.SCHEDULER:
            # Let queued saves land (bounded), so a finished run's prompts are not lost.
            self._wait_idle(timeout=30)
            self._saves.put(None)
            self._pulls.put(None)
            self._piece_loads.shutdown(wait=False)
        if self._daemon.client is not None:
            self._daemon.client.close()


# -- helpers ---------------------------------------------------------------------------------


def _namespace_descriptor(vllm_config, kv_cache_config):
    """The namespace fields from vLLM's configuration, and the bytes of one block."""
    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    spec, num_layers = None, 0
    if kv_cache_config is not None and kv_cache_config.kv_cache_groups:
        group = kv_cache_config.kv_cache_groups[0]
        spec, num_layers = group.kv_cache_spec, len(group.layer_names)
    kv_heads = getattr(spec, "num_kv_heads", None) or mc.get_num_kv_heads(pc)
    head_size = getattr(spec, "head_size", None) or mc.get_head_size()
    dtype = getattr(spec, "dtype", None) or mc.dtype
    block_bytes = spec.page_size_bytes * num_layers if spec is not None else 0
    try:
        from vllm.v1.core.kv_cache_utils import get_none_hash_seed

        seed = get_none_hash_seed()
    except ImportError:
        seed = ""
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
        "hash_algo": str(cc.prefix_caching_hash_algo),
        "hash_seed": seed,
        "block_bytes": block_bytes,
    }
    return desc, block_bytes


def _rank(pc, kind):
    try:
        from vllm.distributed import parallel_state

        group = parallel_state.get_tp_group() if kind == "tp" else parallel_state.get_pp_group()
        return group.rank_in_group
    except Exception:  # the scheduler process has no groups: rank 0 speaks for all
        return 0


def _warn_if_hashes_are_private(vllm_config):
    algo = str(vllm_config.cache_config.prefix_caching_hash_algo)
    if algo.startswith("xxhash") and os.environ.get("PYTHONHASHSEED") is None:
        logger.warning(
            "kvtier: prefix_caching_hash_algo=%s with no PYTHONHASHSEED: block hashes are random per "
            "process, so blocks saved by this engine cannot be shared with any other process",
            algo,
        )
