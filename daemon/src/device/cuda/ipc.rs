//! An engine's KV tensors and events opened from CUDA IPC handles in the daemon's context.
//!
//! Each registered cache gets its own stream, so one engine's event never delays another's
//! copies. A copy waits on the GPU for the engine's event (opened once per handle and kept), is
//! one `kvtier_copy` launch, and is followed by one of a few interprocess events of the daemon's
//! own, whose handle the engine's stream waits on: neither side's CPU waits for the other's GPU
//! work.

use super::driver::{driver_err, enqueue, pool_device_address, upload, Registered};
use crate::device::gather::{kernel_args, Direction};
use crate::device::layout::Segment;
use crate::device::process::EngineProcess;
use crate::device::{DeviceError, EngineMemory, EngineTensor, Queued};
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaStream};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Bytes of a CUDA IPC memory or event handle.
pub const IPC_HANDLE_BYTES: usize = 64;

/// Largest piece one thread block of `kvtier_copy` copies.
const MAX_PIECE: u64 = 256 << 10;

/// Interprocess events the daemon records behind its copies, used in turn.
const DONE_EVENTS: usize = 16;

/// Engine events kept open per registered cache (a connector uses a handful).
const MAX_ENGINE_EVENTS: usize = 64;

/// The driver's form of a 64-byte IPC handle (`what`: "memory" or "event"), its length checked.
fn raw_handle(bytes: &[u8], what: &str) -> Result<[std::ffi::c_char; IPC_HANDLE_BYTES], DeviceError> {
    let raw: [u8; IPC_HANDLE_BYTES] = bytes.try_into().map_err(|_| {
        DeviceError::Memory(format!("a CUDA IPC {what} handle has {IPC_HANDLE_BYTES} bytes, not {}", bytes.len()))
    })?;
    Ok(raw.map(|b| b as _))
}

/// A CUDA event owned by this process (created, or opened from another process's handle).
struct Event {
    ctx: Arc<CudaContext>,
    raw: sys::CUevent,
}

// SAFETY: a CUevent may be used from any thread once its context is bound there (done before
// every use below).
unsafe impl Send for Event {}
// SAFETY: as above; record, wait and synchronize are thread-safe in the driver.
unsafe impl Sync for Event {}

impl Event {
    /// A new interprocess event (no timing; waiting on it sleeps rather than spins where the
    /// driver allows).
    fn interprocess(ctx: &Arc<CudaContext>) -> Result<(Self, Vec<u8>), DeviceError> {
        let ipc = sys::CUevent_flags::CU_EVENT_INTERPROCESS as u32 | sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        let mut raw: sys::CUevent = std::ptr::null_mut();
        // SAFETY: creates an event in the bound context.
        let blocking = unsafe { sys::cuEventCreate(&mut raw, ipc | sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as u32) };
        if blocking.result().is_err() {
            // SAFETY: as above.
            unsafe { sys::cuEventCreate(&mut raw, ipc) }.result().map_err(driver_err("creating an IPC event"))?;
        }
        let event = Self { ctx: Arc::clone(ctx), raw };
        let mut handle = sys::CUipcEventHandle_st { reserved: [0; IPC_HANDLE_BYTES] };
        // SAFETY: an interprocess event of this context.
        unsafe { sys::cuIpcGetEventHandle(&mut handle, raw) }.result().map_err(driver_err("exporting an event"))?;
        Ok((event, handle.reserved.iter().map(|&c| c as u8).collect()))
    }

    /// Opens an event another process exported.
    fn open(ctx: &Arc<CudaContext>, handle: &[u8]) -> Result<Self, DeviceError> {
        let h = sys::CUipcEventHandle_st { reserved: raw_handle(handle, "event")? };
        let mut raw: sys::CUevent = std::ptr::null_mut();
        // SAFETY: a handle of the right size; the context is bound to this thread.
        unsafe { sys::cuIpcOpenEventHandle(&mut raw, h) }
            .result()
            .map_err(|e| DeviceError::Memory(format!("opening the engine's CUDA IPC event: {e:?}")))?;
        Ok(Self { ctx: Arc::clone(ctx), raw })
    }

    fn record(&self, stream: &CudaStream) -> Result<(), DeviceError> {
        // SAFETY: both belong to the bound context.
        unsafe { sys::cuEventRecord(self.raw, stream.cu_stream()) }.result().map_err(driver_err("recording an event"))
    }

    fn synchronize(&self) -> Result<(), DeviceError> {
        self.ctx.bind_to_thread().map_err(driver_err("binding the context"))?;
        // SAFETY: a live event of this context.
        unsafe { sys::cuEventSynchronize(self.raw) }.result().map_err(driver_err("waiting for a copy"))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: created or opened by this process, destroyed once.
        let _ = unsafe { sys::cuEventDestroy_v2(self.raw) };
    }
}

/// An engine's KV tensors opened from CUDA IPC handles, with the events that order copies.
pub struct CudaMemory {
    ctx: Arc<CudaContext>,
    /// Copies, in order, each behind its engine event.
    stream: Arc<CudaStream>,
    /// Uploads of copy arguments: never behind another process's event, so an upload (which
    /// returns once staged) never waits for the engine.
    uploads: Arc<CudaStream>,
    copy: CudaFunction,
    registered: Registered,
    /// Device address of each tensor.
    tensors: Vec<u64>,
    /// Allocations opened with cuIpcOpenMemHandle, closed on drop.
    opened: Vec<u64>,
    /// The engine's events, by handle.
    engine_events: Mutex<HashMap<Vec<u8>, Event>>,
    /// The daemon's interprocess events, with their handles, used in turn.
    done: Vec<(Arc<Event>, Vec<u8>)>,
    next_done: AtomicUsize,
    /// The engine process (when its pid is visible): a save whose engine exited before the copy
    /// was seen complete is not committed (its memory may have gone while it was read).
    engine: Option<Arc<EngineProcess>>,
}

impl CudaMemory {
    /// Opens every tensor's allocation (once per distinct handle) and checks each tensor fits it.
    pub fn open(
        ctx: &Arc<CudaContext>,
        copy: &CudaFunction,
        registered: &Registered,
        pid: Option<i32>,
        tensors: &[EngineTensor],
    ) -> Result<Self, DeviceError> {
        ctx.bind_to_thread().map_err(driver_err("binding the context"))?;
        let mut done = Vec::with_capacity(DONE_EVENTS);
        for _ in 0..DONE_EVENTS {
            let (event, handle) = Event::interprocess(ctx)?;
            done.push((Arc::new(event), handle));
        }
        let mut memory = Self {
            ctx: Arc::clone(ctx),
            stream: ctx.new_stream().map_err(driver_err("creating a stream"))?,
            uploads: ctx.new_stream().map_err(driver_err("creating a stream"))?,
            copy: copy.clone(),
            registered: Arc::clone(registered),
            tensors: Vec::new(),
            opened: Vec::new(),
            engine_events: Mutex::new(HashMap::new()),
            done,
            next_done: AtomicUsize::new(0),
            engine: pid.filter(|&p| p > 0).and_then(|p| EngineProcess::open(p).ok()).map(Arc::new),
        };
        memory.open_tensors(tensors)?;
        Ok(memory)
    }

    fn open_tensors(&mut self, tensors: &[EngineTensor]) -> Result<(), DeviceError> {
        let mut by_handle: HashMap<&[u8], (u64, usize)> = HashMap::new();
        for (i, t) in tensors.iter().enumerate() {
            let raw =
                raw_handle(&t.ipc_handle, "memory").map_err(|e| DeviceError::Memory(format!("tensor {i}: {e}")))?;
            let (base, size) = match by_handle.get(&t.ipc_handle[..]) {
                Some(&opened) => opened,
                None => {
                    let opened = self.open_allocation(i, raw)?;
                    by_handle.insert(&t.ipc_handle[..], opened);
                    opened
                }
            };
            if t.ipc_offset.checked_add(t.bytes).is_none_or(|end| end > size as u64) {
                return Err(DeviceError::Memory(format!(
                    "tensor {i}: {} bytes at offset {} exceed its allocation of {size}",
                    t.bytes, t.ipc_offset
                )));
            }
            self.tensors.push(base + t.ipc_offset);
        }
        Ok(())
    }

    /// Maps the allocation behind `handle`; returns its device address and size.
    fn open_allocation(
        &mut self,
        i: usize,
        handle: [std::ffi::c_char; IPC_HANDLE_BYTES],
    ) -> Result<(u64, usize), DeviceError> {
        let h = sys::CUipcMemHandle_st { reserved: handle };
        let mut base: sys::CUdeviceptr = 0;
        let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
        // SAFETY: a handle of the right size; the context is bound to this thread.
        unsafe { sys::cuIpcOpenMemHandle_v2(&mut base, h, flags) }
            .result()
            .map_err(|e| DeviceError::Memory(format!("tensor {i}: opening its CUDA IPC handle: {e:?}")))?;
        self.opened.push(base);
        let (mut start, mut size) = (0, 0);
        // SAFETY: `base` was just mapped into this context.
        unsafe { sys::cuMemGetAddressRange_v2(&mut start, &mut size, base) }
            .result()
            .map_err(driver_err("sizing an opened allocation"))?;
        Ok((base, size))
    }

    /// Makes the stream wait for the engine's event `handle` (opened on first use).
    fn wait_for_engine(&self, handle: &[u8]) -> Result<(), DeviceError> {
        let mut events = self.engine_events.lock().unwrap_or_else(|e| e.into_inner());
        if !events.contains_key(handle) {
            if events.len() >= MAX_ENGINE_EVENTS {
                // A connector uses a few; one that keeps minting new ones gets them closed.
                events.clear();
            }
            events.insert(handle.to_vec(), Event::open(&self.ctx, handle)?);
        }
        let event = &events[handle];
        // SAFETY: the stream and the opened event belong to the bound context.
        unsafe { sys::cuStreamWaitEvent(self.stream.cu_stream(), event.raw, 0) }
            .result()
            .map_err(driver_err("waiting on the engine's event"))
    }
}

impl EngineMemory for CudaMemory {
    fn copy(&self, plan: &[Segment], dir: Direction) -> Result<(), DeviceError> {
        let queued = self.queue(plan, dir, &[])?;
        (queued.wait)()
    }

    /// One `kvtier_copy` launch over the whole plan on this cache's stream, behind the engine's
    /// event, followed by one of the daemon's interprocess events.
    fn queue(&self, plan: &[Segment], dir: Direction, after: &[u8]) -> Result<Queued, DeviceError> {
        self.ctx.bind_to_thread().map_err(driver_err("binding the context"))?;
        let on_device = (plan.iter())
            .map(|s| {
                let pool = pool_device_address(&self.registered, s.pool_offset as usize)
                    .ok_or_else(|| DeviceError::Memory("a slot outside the registered pool".into()))?;
                Ok(Segment { pool_offset: pool, ..*s })
            })
            .collect::<Result<Vec<_>, DeviceError>>()?;
        let args =
            kernel_args(&on_device, &self.tensors, dir, MAX_PIECE).map_err(|e| DeviceError::Memory(e.to_string()))?;
        let args = upload(&self.uploads, &args)?;
        self.stream.join(&self.uploads).map_err(driver_err("ordering the copy after its arguments"))?;
        if !after.is_empty() {
            self.wait_for_engine(after)?;
        }
        if let Some(args) = &args {
            enqueue(&self.stream, &self.copy, args)?;
        }
        let (event, handle) = &self.done[self.next_done.fetch_add(1, Relaxed) % DONE_EVENTS];
        event.record(&self.stream)?;
        let event = Arc::clone(event);
        let engine = self.engine.clone().filter(|_| dir == Direction::ToPool);
        let wait = move || {
            let done = event.synchronize();
            drop(args); // read by the launch: freed once it has completed
            done?;
            // An engine that exited meanwhile may have freed what was read (best effort: an exit
            // in progress may not show yet).
            engine.map_or(Ok(()), |e| e.alive().map_err(|e| DeviceError::Memory(format!("{e}: its save is dropped"))))
        };
        Ok(Queued { event: handle.clone(), wait: Box::new(wait) })
    }
}

impl Drop for CudaMemory {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        let _ = self.stream.synchronize();
        let _ = self.uploads.synchronize();
        for &p in &self.opened {
            // SAFETY: opened by cuIpcOpenMemHandle in this context; no copy uses it any more.
            let _ = unsafe { sys::cuIpcCloseMemHandle(p) };
        }
    }
}
