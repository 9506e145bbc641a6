"""CUDA pieces of daemon-side copies for GPU engines: IPC handles of KV tensors' allocations
(through the driver API with ctypes, so any allocator's plain `cudaMalloc` memory works, with no
reliance on torch internals) and the interprocess events that order the daemon's copies with the
engine's stream (through torch)."""

import ctypes
import threading

import torch

IPC_HANDLE_BYTES = 64
# Engine events used in turn, per thread: re-recording one (on the same thread's stream) before
# the daemon waited on it only makes the daemon wait for a later point of that stream.
_ENGINE_EVENTS = 16
# Daemon events kept open (the daemon uses 16 per registered cache and connection).
_MAX_DAEMON_EVENTS = 64


class _IpcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * IPC_HANDLE_BYTES)]


class _Uuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_ubyte * 16)]


_driver = None


def _cuda():
    global _driver
    if _driver is None:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuMemGetAddressRange_v2.argtypes = [
            ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
        lib.cuIpcGetMemHandle.argtypes = [ctypes.POINTER(_IpcMemHandle), ctypes.c_uint64]
        lib.cuDeviceGet.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        lib.cuDeviceGetUuid_v2.argtypes = [ctypes.POINTER(_Uuid), ctypes.c_int]
        _driver = lib
    return _driver


def gpu_uuid(device):
    """The UUID of torch CUDA device `device` (16 bytes, `cuDeviceGetUuid_v2`): how the daemon,
    which may number the node's GPUs differently, finds the same GPU."""
    lib = _cuda()
    dev, uuid = ctypes.c_int(), _Uuid()
    rc = lib.cuDeviceGet(ctypes.byref(dev), torch.device(device).index or 0)
    if rc == 0:
        rc = lib.cuDeviceGetUuid_v2(ctypes.byref(uuid), dev)
    if rc != 0:
        raise OSError(f"reading the GPU's UUID failed ({rc})")
    return bytes(uuid.bytes)


def export_allocation(tensor):
    """`(handle, offset, allocation bytes)`: the CUDA IPC memory handle of the allocation holding
    `tensor`'s first byte and that byte's offset in it. Raises OSError if the memory cannot be
    shared (e.g. torch's expandable segments, which legacy IPC does not cover)."""
    with torch.cuda.device(tensor.device):
        torch.cuda.synchronize()  # makes the device's primary context current on this thread
        lib = _cuda()
        ptr = tensor.data_ptr()
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        rc = lib.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr))
        if rc != 0:
            raise OSError(f"cuMemGetAddressRange failed ({rc})")
        handle = _IpcMemHandle()
        rc = lib.cuIpcGetMemHandle(ctypes.byref(handle), base)
        if rc != 0:
            raise OSError(f"cuIpcGetMemHandle failed ({rc}): the KV cache's memory cannot be shared")
        return bytes(handle.reserved), ptr - base.value, size.value


class StreamEvents:
    """Orders daemon copies with the engine's CUDA stream: `record()` records an event on the
    current stream (a save's thread waits for it); `mark()` also returns its IPC handle (a load's
    copy waits for it on the GPU); `wait(handle)` makes the current stream wait for the daemon's
    event behind a load."""

    def __init__(self, device):
        self.device = torch.device(device)
        self._mine = threading.local()
        self._theirs = {}

    def record(self):
        """Records one of this thread's events on its current stream and returns it."""
        mine = self._mine
        if not hasattr(mine, "events"):
            mine.events, mine.next = [torch.cuda.Event(interprocess=True) for _ in range(_ENGINE_EVENTS)], 0
        event = mine.events[mine.next % _ENGINE_EVENTS]
        mine.next += 1
        event.record(torch.cuda.current_stream(self.device))
        return event

    def mark(self):
        """Records an event on this thread's current stream; returns its IPC handle."""
        return bytes(self.record().ipc_handle())

    def wait(self, handle):
        """The current stream waits for the daemon's event `handle` before what is queued next."""
        event = self._theirs.get(handle)
        if event is None:
            if len(self._theirs) >= _MAX_DAEMON_EVENTS:
                self._theirs.clear()
            event = self._theirs[handle] = torch.cuda.Event.from_ipc_handle(self.device, handle)
        torch.cuda.current_stream(self.device).wait_event(event)
