"""The scheduler half of the connector: asks the daemon how many leading blocks of a request it
holds (`Lookup` on the prompt's block keys, `kvtier.keys`, starting promotions of blocks only on disk),
plans loads into the blocks vLLM allocates, and plans a save of the prompt's full blocks in the
step that finishes its prefill. P/D: the decode side plans an asynchronous load that the worker
pulls from the prefill daemon first; the prefill side names its daemon in kv_transfer_params."""

from ..client import KvTierError
from .common import LOOKUP_TIMEOUT_S, Daemon, KvTierMetadata, Transfer, prompt_keys


class SchedulerSide:
    """What the scheduler process keeps per request, and its connection to the daemon."""

    def __init__(self, settings, counters):
        self.settings = settings
        self.counters = counters
        self.daemon = Daemon(settings.socket_path, settings.name, settings.descriptor,
                             lambda: counters.count("daemon_timeouts", 1), engine=settings.engine())
        self.requests = {}  # req_id -> Request (while scheduled)
        self.local = {}  # req_id -> tokens computed locally (engine prefix cache)
        self.block_ids = {}  # req_id -> block ids allocated so far
        self.pending_loads = {}  # req_id -> Transfer, planned in update_state_after_alloc
        self.prefilled = set()  # req ids whose prompt save was planned
        self.saving = set()  # req ids with a save not yet reported finished
        self.pulling = {}  # req_id -> prefill daemon, for P/D loads not yet planned
        self.pulled = set()  # req ids whose P/D source was taken from kv_transfer_params
        self.loading = set()  # req ids with an asynchronous (P/D) load not yet reported done
        self.keys = {}  # req_id -> the block keys of its prompt's full blocks

    def prompt_keys(self, request):
        """The keys of the request's prompt blocks (computed once per request)."""
        keys = self.keys.get(request.request_id)
        if keys is None:
            keys = self.keys[request.request_id] = prompt_keys(request, self.settings.block_size)
        return keys

    def loadable_blocks(self, request):
        # At least one prompt token must be computed by the model to produce logits.
        n_prompt = len(request.prompt_token_ids or [])
        return min(len(self.prompt_keys(request)), max(n_prompt - 1, 0) // self.settings.block_size)

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        block_size = self.settings.block_size
        self.requests[request.request_id] = request
        self.local[request.request_id] = num_computed_tokens
        n = self.loadable_blocks(request)
        first = num_computed_tokens // block_size
        if n <= first:
            return 0, False
        source = self.prefill_source(request)
        if source is not None:
            # Decode side of P/D: the worker pulls the prompt from the prefill daemon and loads
            # it in the background; vLLM schedules other requests meanwhile (and recomputes
            # whatever does not arrive).
            self.pulling[request.request_id] = source
            return (n - first) * block_size, True
        try:
            client, ns = self.daemon.namespace(request.cache_salt)
            if client is None:
                return 0, False
            # Blocks only on disk start moving into the pool now, while vLLM schedules; the
            # worker's load finds them there (or waits for the rest).
            hashes = self.prompt_keys(request)[:n]
            matched, _ = client.lookup_and_prefetch(ns, hashes, timeout=LOOKUP_TIMEOUT_S)
        except (OSError, KvTierError) as e:
            self.daemon.fail(e)
            return 0, False
        return max(0, matched * block_size - num_computed_tokens), False

    def prefill_source(self, request):
        """The prefill daemon to pull `request`'s prompt from (P/D decode side), until its load
        is planned; None otherwise."""
        if request.request_id in self.pulling:
            return self.pulling[request.request_id]
        if request.request_id in self.pulled:
            return None
        params = getattr(request, "kv_transfer_params", None) or {}
        source = params.get("kvtier_source")
        if source:
            self.pulled.add(request.request_id)
        return source or None

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        self.requests[request.request_id] = request
        if num_external_tokens <= 0:
            return
        # Counted here, once per request (the lookup may be asked more than once).
        self.counters.count("matched_tokens", num_external_tokens)
        block_ids = blocks.get_block_ids()[0]
        first = self.local.get(request.request_id, 0) // self.settings.block_size
        last = first + num_external_tokens // self.settings.block_size
        hashes = self.prompt_keys(request)[first:last]
        source = self.pulling.pop(request.request_id, None)
        if source is not None:
            self.loading.add(request.request_id)
        self.pending_loads[request.request_id] = Transfer(
            request.request_id, request.cache_salt or "", list(block_ids[first:last]), hashes, source
        )

    def build_connector_meta(self, scheduler_output):
        meta = KvTierMetadata(loads=list(self.pending_loads.values()))
        self.pending_loads.clear()
        meta.preempted = set(scheduler_output.preempted_req_ids or ())
        for new in scheduler_output.scheduled_new_reqs:
            self.block_ids[new.req_id] = list(new.block_ids[0])
            self.plan_save(meta, new.req_id, new.num_computed_tokens, scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                self.block_ids[req_id] = list(new_ids[0]) if new_ids else []
                self.prefilled.discard(req_id)
            elif new_ids:
                self.block_ids.setdefault(req_id, []).extend(new_ids[0])
            self.plan_save(meta, req_id, cached.num_computed_tokens[i], scheduler_output)
        for req_id in scheduler_output.finished_req_ids:
            self.forget(req_id)
        return meta

    def plan_save(self, meta, req_id, num_computed, scheduler_output):
        """Plans the save of a prompt's full blocks in the step that completes its prefill."""
        request = self.requests.get(req_id)
        if request is None or req_id in self.prefilled:
            return
        n_prompt = len(request.prompt_token_ids or [])
        if num_computed + scheduler_output.num_scheduled_tokens.get(req_id, 0) < n_prompt:
            return
        self.prefilled.add(req_id)
        keys = self.prompt_keys(request)
        n = min(len(keys), len(self.block_ids.get(req_id, [])))
        if n == 0:
            return
        hashes = keys[:n]
        meta.saves.append(Transfer(req_id, request.cache_salt or "", self.block_ids[req_id][:n], hashes))
        self.saving.add(req_id)

    def forget(self, req_id):
        self.pulling.pop(req_id, None)
        self.requests.pop(req_id, None)
        self.keys.pop(req_id, None)
        self.local.pop(req_id, None)
        self.block_ids.pop(req_id, None)
        self.prefilled.discard(req_id)

    def update_connector_output(self, connector_output):
        for req_id in connector_output.finished_sending or ():
            self.saving.discard(req_id)
        for req_id in connector_output.finished_recving or ():
            self.loading.discard(req_id)

    def request_finished(self, request, block_ids):
        self.pulled.discard(request.request_id)
        # Prefill side of P/D: tell the decode request where to pull this prompt's blocks from.
        source = self.settings.transfer_source
        params = {"kvtier_source": source} if source else None
        # Hold the blocks while their save may still be reading them, or a P/D load writing them.
        held = request.request_id in self.saving or request.request_id in self.loading
        return held, params

    def shutdown(self):
        if self.daemon.client is not None:
            self.daemon.client.close()
