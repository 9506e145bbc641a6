"""A synchronous client of kvtierd's connector socket, in pure Python.

Frames are a 4-byte little-endian length and one protobuf message (see docs/protocol.md). The
Hello reply carries SCM_RIGHTS fds, mapped shared: the daemon's pool segments for a client the
operator trusts (one copy between the engine's memory and the pool), else one staging window of
this connection's own (`hello.staged`), through which the daemon copies blocks in and out.
"""

import mmap
import os
import socket
import stat
import struct
import threading
from dataclasses import dataclass

from . import _proto as pb

PROTOCOL_VERSION = 1
_HEADER = struct.Struct("<I")


class KvTierError(Exception):
    """The daemon could not be reached or answered something unexpected."""


class DaemonError(KvTierError):
    """The daemon answered with a typed error (and closed the connection)."""

    def __init__(self, code, reason):
        super().__init__(f"{pb.error_name(code)}: {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Namespace:
    """A namespace registered on a connection."""

    handle: int
    id: bytes
    block_bytes: int


@dataclass(frozen=True)
class Slot:
    """A block's place in the pool: segment index and byte offset."""

    segment: int
    offset: int


# The socket of a node's system daemon (the Kubernetes DaemonSet's).
SYSTEM_SOCKET = "/run/kvtier/kvtierd.sock"


def socket_candidates():
    """Where clients look for kvtierd when given no socket, in order (as the Rust client and the
    CLI do): this user's own daemon ($XDG_RUNTIME_DIR/kvtier or /tmp/kvtier-$UID), the node's
    system daemon, and a daemon root started by hand."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = os.path.join(runtime, "kvtier") if runtime else f"/tmp/kvtier-{os.getuid()}"
    candidates = [os.path.join(base, "kvtierd.sock"), SYSTEM_SOCKET, "/tmp/kvtier-0/kvtierd.sock"]
    return list(dict.fromkeys(candidates))


def is_socket(path):
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def default_socket():
    """$KVTIER_SOCKET, else the first of `socket_candidates()` that is a socket, else this
    user's own path (which then names the path in the "not found" error)."""
    if os.environ.get("KVTIER_SOCKET"):
        return os.environ["KVTIER_SOCKET"]
    candidates = socket_candidates()
    return next((c for c in candidates if is_socket(c)), candidates[0])


class Client:
    """One connection to kvtierd with the pool mapped. Calls are serialized by a lock."""

    def __init__(self, path=None, name="kvtier-python", timeout=10.0, hello_timeout=1.0, engine=None):
        """Connects and says Hello within `hello_timeout` seconds (a live daemon answers in
        milliseconds; one that accepts but never answers is stuck); later calls wait at most
        `timeout` seconds unless they say otherwise. Timeouts raise `TimeoutError`.
        `engine`, `(address, [served model names])`, announces the inference engine this
        connection speaks for (gateways then route to it by the blocks of its node)."""
        self.path = path or default_socket()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(min(timeout, hello_timeout))
        self._lock = threading.Lock()
        self._buf = bytearray()
        self._next_id = 1
        self._maps = []
        try:
            self._sock.connect(self.path)
            self._hello(name, engine)
        except BaseException:
            self.close()
            raise
        self._sock.settimeout(timeout)

    # -- framing ---------------------------------------------------------------------------

    def _send(self, requests):
        out = bytearray()
        for req in requests:
            body = req.SerializeToString()
            out += _HEADER.pack(len(body))
            out += body
        self._sock.sendall(out)

    def _take_frame(self):
        if len(self._buf) < 4:
            return None
        (n,) = _HEADER.unpack_from(self._buf)
        if len(self._buf) < 4 + n:
            return None
        body = bytes(self._buf[4 : 4 + n])
        del self._buf[: 4 + n]
        return body

    def _recv_response(self):
        while True:
            body = self._take_frame()
            if body is not None:
                resp = pb.Response.FromString(body)
                if resp.WhichOneof("result") == "error":
                    raise DaemonError(resp.error.code, resp.error.reason)
                return resp
            chunk = self._sock.recv(1 << 16)
            if not chunk:
                raise KvTierError("daemon closed the connection")
            self._buf += chunk

    def _hello(self, name, engine):
        hello = pb.Request(id=0)
        hello.hello.client_name = name
        hello.hello.protocol_version = PROTOCOL_VERSION
        if engine is not None:
            hello.hello.engine.address = engine[0]
            hello.hello.engine.served_models.extend(engine[1])
        self._send([hello])
        fds = []
        try:
            while (body := self._take_frame()) is None:
                data, got, _flags, _addr = socket.recv_fds(self._sock, 1 << 16, 64)
                fds += got
                if not data:
                    raise KvTierError("daemon closed the connection during Hello")
                self._buf += data
            resp = pb.Response.FromString(body)
            if resp.WhichOneof("result") == "error":
                raise DaemonError(resp.error.code, resp.error.reason)
            self.hello = resp.hello
            if len(fds) != len(self.hello.segments):
                raise KvTierError(f"{len(fds)} fds for {len(self.hello.segments)} pool segments")
            # Not MAP_POPULATE: filling the page tables up front cost every connection ~40 ms
            # per GiB of pool (seconds on a big node), even ones that never touch a slot. A page
            # faults in on first touch instead (the daemon keeps the pool resident: no I/O).
            for fd, seg in zip(fds, self.hello.segments):
                self._maps.append(mmap.mmap(fd, seg.bytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE))
        finally:
            for fd in fds:
                os.close(fd)

    def call_many(self, ops, timeout=None):
        """Sends `(op_name, fields)` requests back to back and returns their replies in order,
        waiting at most `timeout` seconds for each read (default: the connection's). After a
        timeout the connection is out of step with the daemon: close it.

        `fields` is a dict of the op message's fields, e.g. `("lookup", {"handle": 0, "hashes": [...]})`.
        """
        with self._lock:
            if timeout is None:
                return self._call_locked(ops)
            usual = self._sock.gettimeout()
            self._sock.settimeout(timeout)
            try:
                return self._call_locked(ops)
            finally:
                self._sock.settimeout(usual)

    def _call_locked(self, ops):
        reqs = []
        for op, fields in ops:
            req = pb.Request(id=self._next_id)
            self._next_id += 1
            msg = getattr(req, op)
            msg.SetInParent()
            for k, v in fields.items():
                field = getattr(msg, k)
                if isinstance(v, (list, tuple)):
                    field.extend(v)
                elif hasattr(field, "CopyFrom"):
                    field.CopyFrom(v)
                else:
                    setattr(msg, k, v)
            reqs.append(req)
        self._send(reqs)
        return [self._recv_response() for _ in reqs]

    def call(self, op, **fields):
        """Sends one request and returns its reply's result message."""
        resp = self.call_many([(op, fields)])[0]
        return getattr(resp, resp.WhichOneof("result"))

    # -- operations ------------------------------------------------------------------------

    def register(self, descriptor):
        """Registers a namespace (a `NamespaceDescriptor` or a dict of its fields)."""
        if isinstance(descriptor, dict):
            descriptor = pb.NamespaceDescriptor(**descriptor)
        r = self.call("register", namespace=descriptor)
        return Namespace(r.handle, bytes(r.namespace_id), r.block_bytes)

    def lookup(self, ns, hashes):
        """How many leading `hashes` the daemon holds."""
        return self.call("lookup", handle=ns.handle, hashes=list(hashes)).matched

    def lookup_tiers(self, ns, hashes):
        """Tier of each block of the held prefix of `hashes`: `"host"` or `"disk"`."""
        r = self.call("lookup", handle=ns.handle, hashes=list(hashes))
        return ["disk" if t == pb.TIER_DISK else "host" for t in r.tiers]

    def prefetch(self, ns, hashes):
        """Starts promoting the disk-only blocks of the held prefix into the pool; returns how many."""
        return self.call("prefetch", handle=ns.handle, hashes=list(hashes)).queued

    def pull(self, ns, source, hashes, parent=None):
        """Asks the daemon to pull the held prefix of `hashes` from the daemon whose
        TransferService is at `source` (peer tier); `parent` is the hash they continue when they
        are a later piece of a prompt. Returns `(pulled, present, error)`."""
        r = self.call("pull", handle=ns.handle, source=source, hashes=list(hashes), parent=parent or b"")
        return r.pulled, r.present, r.error

    def lookup_and_prefetch(self, ns, hashes, timeout=None):
        """Lookup and prefetch pipelined in one round trip: `(matched, blocks being promoted)`."""
        hashes = list(hashes)
        look, pre = self.call_many(
            [("lookup", {"handle": ns.handle, "hashes": hashes}), ("prefetch", {"handle": ns.handle, "hashes": hashes})],
            timeout,
        )
        return look.lookup.matched, pre.prefetch.queued

    def reserve(self, ns, hashes, parent=None):
        """Reserves slots. Returns `(reservation, outcomes)`: one outcome per hash, a `Slot`
        to write, `"present"` or `"no_space"`."""
        fields = {"handle": ns.handle, "hashes": list(hashes)}
        if parent:
            fields["parent"] = parent
        r = self.call("reserve", **fields)
        slots = iter(zip(r.segments, r.offsets))
        out = []
        for status in r.status:
            if status == pb.RESERVED:
                seg, off = next(slots)
                out.append(Slot(seg, off))
            elif status == pb.PRESENT:
                out.append("present")
            else:
                out.append("no_space")
        return r.reservation, out

    def blocks_at_once(self, block_bytes):
        """How many blocks of `block_bytes` one Reserve or Acquire can hold at once: all of them
        with the pool mapped (a trusted client), else as many as its staging window takes
        (`hello.staged`): request no more, or the rest comes back NO_SPACE / unmatched."""
        if not self.hello.staged:
            return 1 << 30
        stride = -(-block_bytes // 4096) * 4096
        return max(1, self.hello.segments[0].bytes // stride)

    def commit(self, reservation):
        """Makes a reservation's blocks visible."""
        return self.call("commit", reservation=reservation).committed

    def abort(self, reservation):
        """Drops a reservation."""
        self.call("abort", reservation=reservation)

    def acquire(self, ns, hashes):
        """Pins the longest held prefix; returns `(lease, [Slot, ...])`."""
        r = self.call("acquire", handle=ns.handle, hashes=list(hashes))
        return r.lease, [Slot(s, o) for s, o in zip(r.segments, r.offsets)]

    def release(self, lease):
        """Unpins a lease's blocks."""
        self.call("release", lease=lease)

    def register_kv_cache(self, ns, tensors, layers, num_blocks, chunk_bytes, kv_parts=2):
        """Registers engine KV tensors for daemon-side copies (when `hello.device_dma`).

        `tensors`: per tensor a dict of KvTensor fields: `address` (host memory of this process)
        or `ipc_handle`, `ipc_offset` and `device_uuid` (CUDA memory), and `bytes`; `layers`: per layer
        `(tensor index, offset, block_stride, kv_stride)` in bytes. Returns `(cache, error)`:
        `error` is empty when the daemon can reach the memory, else why it cannot.
        """
        r = self.call(
            "register_kv_cache",
            handle=ns.handle,
            tensors=[pb.KvTensor(**t) for t in tensors],
            layers=[pb.KvLayerPlacement(tensor=t, offset=o, block_stride=b, kv_stride=k) for t, o, b, k in layers],
            num_blocks=num_blocks,
            kv_parts=kv_parts,
            chunk_bytes=chunk_bytes,
        )
        return r.cache, r.error

    def save_kv(self, cache, hashes, block_ids, parent=None):
        """The daemon copies engine blocks `block_ids`, which must be written already (on a GPU:
        the kernels writing them have completed), into the pool under `hashes` and commits.
        Returns the SaveKvReply (`saved`, `present`, `no_space`, `error`)."""
        fields = {"cache": cache, "hashes": list(hashes), "block_ids": list(block_ids)}
        if parent:
            fields["parent"] = parent
        return self.call("save_kv", **fields)

    def load_kv(self, cache, hashes, block_ids, wait_event=b"", return_event=False):
        """The daemon copies the held prefix of `hashes` into engine blocks `block_ids`, on a GPU
        once the engine's IPC event `wait_event` has completed. Returns the LoadKvReply
        (`loaded`, `error`, and with `return_event` on a GPU `done_event`: the reply comes once the
        copy is queued, and the engine's stream must wait on that event before reading the
        blocks)."""
        return self.call("load_kv", cache=cache, hashes=list(hashes), block_ids=list(block_ids),
                         wait_event=wait_event, return_event=return_event)

    def stats(self):
        """The daemon's StatsReply."""
        return self.call("stats")

    def view(self, slot, length):
        """A writable memoryview of `length` bytes of the pool at `slot`."""
        m = self._maps[slot.segment]
        if slot.offset + length > len(m):
            raise KvTierError(f"slot {slot} with {length} bytes lies outside the pool")
        return memoryview(m)[slot.offset : slot.offset + length]

    def close(self):
        """Closes the connection; the daemon releases whatever it held."""
        try:
            self._sock.close()
        finally:
            maps, self._maps = self._maps, []
            for m in maps:
                try:
                    m.close()
                except BufferError:
                    pass  # a view is still alive; the mapping goes with it

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
