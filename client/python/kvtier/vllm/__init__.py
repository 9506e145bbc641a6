"""`KvTierConnector`: a vLLM v1 KV connector that saves prompt KV blocks to kvtierd and loads the
longest held prefix back.

Enable it in stock vLLM with:

    --kv-transfer-config '{"kv_connector":"KvTierConnector","kv_connector_module_path":"kvtier.vllm",
                           "kv_role":"kv_both","kv_connector_extra_config":{"socket":"/path/kvtierd.sock"}}'

The connector is a facade over its two halves, as vLLM's own connectors are cut:
`scheduler.py` (in the scheduler process) and `worker.py` (in each worker); `common.py` holds
what they share.

Scheduler side: asks the daemon how many leading blocks of a request it holds (`Lookup` on the
prompt's block keys, `kvtier.keys`), plans loads into the blocks vLLM allocates, and plans a save of the
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

import os

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole

from .common import Counters, KvTierMetadata, KvTierStats, Settings, warn_if_cpu_threads_shift, warn_if_no_daemon
from .scheduler import SchedulerSide
from .worker import WorkerSide

__all__ = ["KvTierConnector", "KvTierMetadata", "KvTierStats"]


class KvTierConnector(KVConnectorBase_V1):
    """vLLM v1 connector backed by kvtierd: each call goes to the half of the role it runs in."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        settings = Settings.of(vllm_config, role, kv_cache_config, extra)
        self._counters = Counters(extra.get("stats_file"), role.name.lower())
        warn_if_no_daemon(settings.socket_path, explicit="socket" in extra or "KVTIER_SOCKET" in os.environ)
        warn_if_cpu_threads_shift(role.name, getattr(vllm_config.device_config, "device_type", ""))
        if getattr(self._kv_transfer_config, "kv_load_failure_policy", "recompute") != "recompute":
            # A cache miss is never an error: blocks that fail to load are recomputed.
            self._kv_transfer_config.kv_load_failure_policy = "recompute"
        self._scheduler = SchedulerSide(settings, self._counters) if role == KVConnectorRole.SCHEDULER else None
        self._worker = WorkerSide(settings, self._counters) if role != KVConnectorRole.SCHEDULER else None

    @property
    def requires_kv_delivery(self):
        # A best-effort cache: a dropped save is just a future cache miss.
        return False

    # ---------------------------------------------------------------- scheduler side

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output):
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output):
        self._scheduler.update_connector_output(connector_output)

    def request_finished(self, request, block_ids):
        return self._scheduler.request_finished(request, block_ids)

    # ---------------------------------------------------------------- worker side

    def register_kv_caches(self, kv_caches):
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context, **kwargs):
        self._worker.start_load_kv(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name):
        return

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        return

    def wait_for_save(self):
        self._worker.wait_for_save(self._get_connector_metadata())

    def handle_preemptions(self, kv_connector_metadata):
        self._worker.handle_preemptions(kv_connector_metadata)

    def get_finished(self, finished_req_ids):
        return self._worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self):
        return self._worker.get_block_ids_with_load_errors()

    # ---------------------------------------------------------------- both

    def get_kv_connector_stats(self):
        return self._counters.take()

    @classmethod
    def build_kv_connector_stats(cls, data=None):
        return KvTierStats(data=data) if data is not None else KvTierStats()

    def shutdown(self):
        (self._worker or self._scheduler).shutdown()
