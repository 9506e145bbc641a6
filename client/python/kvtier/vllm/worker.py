"""The worker half of the connector: loads synchronously before the forward pass (acquire, copy
into the KV cache, release; or one `LoadKv` when the daemon copies), saves on a background thread
after the forward pass (reserve, copy, commit; or `SaveKv` in pieces), and P/D loads pulled from
the prefill daemon on a thread of their own. Copies go through the connector's mapping (its
staging window, or the pool for a trusted uid) unless the daemon copies the engine's memory."""

import concurrent.futures
import queue
import threading

import torch

from ..client import KvTierError
from ..layout import block_dim as _block_dim, block_slice as _block_slice, dma_layout as _dma_layout
from .common import Daemon, Transfer, logger


class WorkerSide:
    """A worker's KV tensors, its connections to the daemon and its saver and puller threads."""

    def __init__(self, settings, counters):
        self.settings = settings
        self.counters = counters
        self.block_bytes = settings.block_bytes
        on_timeout = lambda: counters.count("daemon_timeouts", 1)  # noqa: E731
        self.daemon = Daemon(settings.socket_path, settings.name, settings.descriptor, on_timeout)
        self.dma_layout = None  # set by register_kv_caches when the daemon may copy
        self.events = None  # GPU engines with daemon-side copies: cuda.StreamEvents
        self.layers = []  # [(name, tensor, block_dim)]
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
        self.puller = Daemon(settings.socket_path, settings.name + "-pull", settings.descriptor, on_timeout)
        self._pulls = queue.Queue()
        self._pulls_done = set()
        self._pull_thread = threading.Thread(target=self._pull_loop, name="kvtier-pull", daemon=True)
        self._pull_thread.start()
        # Pieces of a prompt pulled in pieces (`pull_piece_bytes`) load over yet another
        # connection while the next one is pulled; the last loads over the pull's own.
        self.piece_loader = Daemon(settings.socket_path, settings.name + "-pd-load", settings.descriptor, on_timeout)
        self.piece_loads = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvtier-pd-load")

    def register_kv_caches(self, kv_caches):
        layers = []
        for name in sorted(kv_caches):
            t = kv_caches[name]
            if isinstance(t, (list, tuple)):
                raise NotImplementedError("kvtier: per-layer KV given as a list is not supported yet")
            layers.append((name, t, _block_dim(t, self.settings.num_blocks)))
        per_block = sum(_block_slice(t, d, 0).numel() * t.element_size() for _, t, d in layers)
        if per_block != self.block_bytes:
            logger.warning("kvtier: KV tensors hold %d bytes per block, config says %d; using %d",
                           per_block, self.block_bytes, per_block)
            self.block_bytes = per_block
            self.daemon.descriptor = dict(self.settings.descriptor, block_bytes=per_block)
            self.puller.descriptor = self.piece_loader.descriptor = self.daemon.descriptor
        self.layers = layers
        self.dma_layout = _dma_layout(layers) if self.settings.device_copy else None
        if self.dma_layout and layers[0][1].device.type == "cuda":
            from ..cuda import StreamEvents

            self.events = StreamEvents(layers[0][1].device)
        logger.info("kvtier: %d KV layers, %d bytes per block, daemon at %s%s",
                    len(layers), per_block, self.daemon.socket_path,
                    "" if self.dma_layout else " (the connector copies)")

    def _copy_block(self, view, block_id, to_pool):
        """Copies one block between the KV cache (all layers) and a pool slot's memoryview."""
        pool = torch.frombuffer(view, dtype=torch.uint8)
        off = 0
        for _, t, dim in self.layers:
            src = _block_slice(t, dim, block_id)
            n = src.numel() * t.element_size()
            slot = pool[off : off + n].view(t.dtype).view(src.shape)
            if to_pool:
                slot.copy_(src)
            else:
                src.copy_(slot)
            off += n

    def start_load_kv(self, meta):
        for job in meta.loads:
            if job.source is not None:
                self._pulls.put(job)
            else:
                self._load(self.daemon, job, on_engine_stream=True)

    def _load(self, daemon, job, on_engine_stream=False):
        """Loads `job`'s held prefix into its blocks over `daemon`'s connection; the rest is
        reported as load errors (vLLM recomputes them). `on_engine_stream` (the thread that runs
        the forward pass): a GPU copy is ordered with this thread's stream by events, and no CPU
        thread waits for it."""
        self._report_load(job, self._load_blocks(daemon, job, on_engine_stream))

    def _load_blocks(self, daemon, job, on_engine_stream=False):
        """Loads `job`'s held prefix into its blocks; returns how many blocks were loaded."""
        try:
            client, ns, cache = daemon.kv_cache(job.cache_salt, self.dma_layout)
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
        self.counters.count("loaded_tokens", loaded * self.settings.block_size)
        self.counters.count("load_errors", len(failed))
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
        whole = self.settings.pull_piece_bytes <= 0
        step = max(1, len(job.hashes) if whole else self.settings.pull_piece_bytes // max(self.block_bytes, 1))
        loads, pulled, error = [], 0, ""  # loads: (blocks held, future of blocks loaded)
        try:
            for at in range(0, len(job.hashes), step):
                piece = Transfer(job.req_id, job.cache_salt, job.block_ids[at : at + step], job.hashes[at : at + step])
                new, present, error = self._pull_piece(job.source, piece, job.hashes[at - 1] if at else None)
                pulled, held = pulled + new, new + present
                last = error or held < len(piece.hashes) or at + step >= len(job.hashes)
                piece.block_ids, piece.hashes = piece.block_ids[:held], piece.hashes[:held]
                if last:
                    # Nothing more to pull: this piece loads here, over the pull's connection.
                    done = concurrent.futures.Future()
                    done.set_result(self._load_blocks(self.puller, piece) if held else 0)
                    loads.append((held, done))
                    break
                loads.append((held, self.piece_loads.submit(self._load_blocks, self.piece_loader, piece)))
        finally:
            # Every load must be over before any block is reported failed: vLLM recomputes into
            # a failed block, and a late load must not write over that.
            concurrent.futures.wait([load for _, load in loads])
        if error:
            logger.warning("kvtier: pulling request %s from %s failed (recomputing): %s",
                           job.req_id, job.source, error)
            self.counters.count("pull_errors", 1)
        self.counters.count("pulled_blocks", pulled)
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
            client, ns = self.puller.namespace(piece.cache_salt)
            if client is None:
                return 0, 0, "kvtierd unavailable"
            return client.pull(ns, source, piece.hashes, parent)
        except (OSError, KvTierError) as e:
            self.puller.fail(e)
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
        self.counters.count("daemon_copied_blocks", blocks)  # a failed save may have committed pieces
        if error:
            logger.debug("kvtier: daemon-side %s of %s failed (copying instead): %s",
                         "save" if save else "load", job.req_id, error)
            self.counters.count("daemon_copy_errors", 1)
            return None
        return blocks

    def _load_by_daemon(self, client, cache, job, on_engine_stream):
        """LoadKv; on a GPU behind an event of this thread's stream. On the engine's stream the
        reply comes once the copy is queued and the stream waits for the daemon's event; elsewhere
        the reply comes once it is done. Returns `(blocks loaded, error)`."""
        if self.events is None:
            reply = client.load_kv(cache, job.hashes, job.block_ids)
            return reply.loaded, reply.error
        free = self.events.mark()  # the blocks' previous readers are done
        reply = client.load_kv(cache, job.hashes, job.block_ids, wait_event=free, return_event=on_engine_stream)
        if reply.done_event:
            self.events.wait(reply.done_event)
        return reply.loaded, reply.error

    def _save_in_pieces(self, client, cache, job):
        """SaveKv in pieces of about `save_piece_bytes`: loads share this connection, and one
        waits for at most one piece of a long save. Returns `(blocks saved, error)`."""
        step = max(1, self.settings.save_piece_bytes // max(self.block_bytes, 1))
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
        step = client.blocks_at_once(self.block_bytes)
        loaded = 0
        for at in range(0, len(job.hashes), step):
            lease, slots = client.acquire(ns, job.hashes[at : at + step])
            try:
                for block_id, slot in zip(job.block_ids[at : at + step], slots):
                    self._copy_block(client.view(slot, self.block_bytes), block_id, to_pool=False)
                    loaded += 1
            finally:
                if lease:
                    client.release(lease)
            if len(slots) < len(job.hashes[at : at + step]):
                break
        return loaded

    def wait_for_save(self, meta):
        # The forward pass of this step is done: hand this step's saves to the saver thread.
        written = self.events.record() if self.events is not None and meta.saves else None
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
            client, ns, cache = self.daemon.kv_cache(job.cache_salt, self.dma_layout)
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
            self.counters.count("saved_tokens", saved * self.settings.block_size)
        except (OSError, KvTierError) as e:
            self.daemon.fail(e)

    def _save_by_copy(self, client, ns, job):
        """Saves `job` through the client's mapping (reserve, copy, commit; through a staging
        window a window-full at a time); returns the blocks stored."""
        step = client.blocks_at_once(self.block_bytes)
        stored = 0
        for at in range(0, len(job.hashes), step):
            parent = job.hashes[at - 1] if at else None
            reservation, outcomes = client.reserve(ns, job.hashes[at : at + step], parent)
            try:
                for block_id, outcome in zip(job.block_ids[at : at + step], outcomes):
                    if not isinstance(outcome, str):
                        self._copy_block(client.view(outcome, self.block_bytes), block_id, to_pool=True)
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

    def shutdown(self):
        # Let queued saves land (bounded), so a finished run's prompts are not lost.
        self._wait_idle(timeout=30)
        self._saves.put(None)
        self._pulls.put(None)
        self.piece_loads.shutdown(wait=False)
        if self.daemon.client is not None:
            self.daemon.client.close()
