//! The CUDA backend (cudarc, driver API loaded at run time: no CUDA needed to build).
//!
//! Opening it checks that `libcuda` and NVRTC are present (cudarc panics on a missing library, so
//! this is checked first), creates a context on device 0, page-locks the pool with
//! `cuMemHostRegister` so the GPU can DMA to and from it, and compiles the gather/scatter kernel
//! (`kernel.cu`) with NVRTC. [`DeviceBackend::import`] opens an engine's KV tensors from their
//! CUDA IPC memory handles; each copy is one `kvtier_copy` launch. See `docs/gpu.md` for what is
//! verified where.

mod driver;
mod ipc;

pub use driver::{driver_present, nvrtc_present};
pub use ipc::IPC_HANDLE_BYTES;

use super::gather::KernelArgs;
use super::{DeviceBackend, DeviceError, EngineMemory, EngineTensor};
use crate::pool::HostPool;
use cudarc::driver::{sys, CudaContext, CudaEvent, CudaFunction, CudaStream};
use cudarc::nvrtc::Ptx;
use driver::{driver_err, enqueue, pool_device_address, upload, Registered};
use ipc::CudaMemory;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The CUDA bindings this backend uses (for benchmarks and tools built on it).
pub use cudarc;

/// Source of the gather/scatter kernel, compiled at run time.
pub const KERNEL_SOURCE: &str = include_str!("kernel.cu");

/// One GPU as the daemon uses it: its (primary) context, the copy kernel loaded there and the
/// pool's device addresses in that context.
pub(super) struct Device {
    pub(super) ctx: Arc<CudaContext>,
    pub(super) copy: CudaFunction,
    pub(super) registered: Registered,
}

impl Device {
    /// Loads the kernel into `ctx` and maps the (portably registered) pool segments there.
    fn open(ctx: Arc<CudaContext>, ptx: &Ptx, segments: &[(usize, usize)]) -> Result<Self, DeviceError> {
        let module = ctx.load_module(ptx.clone()).map_err(driver_err("loading the copy kernel"))?;
        let copy = module.load_function("kvtier_copy").map_err(driver_err("finding kvtier_copy"))?;
        ctx.bind_to_thread().map_err(driver_err("binding the context"))?;
        let mut registered = Vec::with_capacity(segments.len());
        for &(host, len) in segments {
            let mut device: sys::CUdeviceptr = 0;
            // SAFETY: `host` is registered (portable, device-mapped) for the backend's life.
            unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device, host as *mut _, 0) }
                .result()
                .map_err(driver_err("cuMemHostGetDevicePointer of the pool"))?;
            registered.push((host, len, device));
        }
        Ok(Self { ctx, copy, registered: Arc::new(registered) })
    }
}

/// The CUDA devices with the pool registered and the copy kernel compiled. The first GPU's
/// context is made at start (it registers the pool); another GPU's when an engine on it first
/// registers its KV cache, so a daemon holds contexts only on GPUs it copies for.
pub struct CudaBackend {
    first: Arc<Device>,
    /// The first GPU's stream for [`CudaBackend::launch`].
    stream: Arc<CudaStream>,
    ptx: Ptx,
    /// Pool segments (host address, bytes), registered with every context.
    segments: Vec<(usize, usize)>,
    /// UUID of each visible GPU, by ordinal.
    uuids: Vec<[u8; 16]>,
    /// GPUs opened so far, by ordinal.
    devices: Mutex<HashMap<usize, Arc<Device>>>,
}

/// The ordinal of the GPU with `uuid` among `uuids`; the first GPU for an empty one.
fn gpu_of(uuids: &[[u8; 16]], uuid: &[u8]) -> Result<usize, DeviceError> {
    if uuid.is_empty() {
        return Ok(0);
    }
    uuids.iter().position(|u| u[..] == *uuid).ok_or_else(|| {
        let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
        DeviceError::Memory(format!(
            "no GPU with UUID {hex} is visible to the daemon (its NVIDIA_VISIBLE_DEVICES must include the engine's)"
        ))
    })
}

impl CudaBackend {
    /// Opens the first GPU, registers the pool's segments, compiles the kernel; refuses with a
    /// clear message when the driver or NVRTC is missing.
    pub fn open(pool: &HostPool) -> Result<Self, DeviceError> {
        if !driver_present() {
            return Err(DeviceError::NoDriver(
                "device.backend = \"cuda\" needs the NVIDIA driver (libcuda.so.1), which is not on this machine; \
                 use \"host\" (or \"auto\")"
                    .into(),
            ));
        }
        if !nvrtc_present() {
            return Err(DeviceError::NoDriver(
                "device.backend = \"cuda\" needs NVRTC (libnvrtc.so, from the CUDA toolkit) to compile its copy kernel"
                    .into(),
            ));
        }
        let ctx = CudaContext::new(0).map_err(driver_err("context on device 0"))?;
        let uuids = gpu_uuids()?;
        let ptx = cudarc::nvrtc::compile_ptx(KERNEL_SOURCE)
            .map_err(|e| DeviceError::Driver(format!("NVRTC compiling the copy kernel: {e:?}")))?;
        let mut segments = Vec::new();
        let unregister = |segments: &[(usize, usize)]| {
            for &(host, _) in segments {
                // SAFETY: registered below, still mapped.
                let _ = unsafe { sys::cuMemHostUnregister(host as *mut _) };
            }
        };
        for seg in pool.segments() {
            let (host, len) = (seg.as_ptr() as usize, seg.len() as usize);
            let flags = sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP;
            // SAFETY: the segment is mapped for the daemon's life; unregistered on drop.
            let done = unsafe { sys::cuMemHostRegister_v2(host as *mut _, len, flags) }.result();
            if let Err(e) = done {
                unregister(&segments);
                return Err(driver_err("cuMemHostRegister of the pool")(e));
            }
            segments.push((host, len));
        }
        let first = match Device::open(Arc::clone(&ctx), &ptx, &segments) {
            Ok(d) => Arc::new(d),
            Err(e) => {
                unregister(&segments);
                return Err(e);
            }
        };
        Ok(Self {
            stream: ctx.new_stream().map_err(driver_err("creating a stream"))?,
            devices: Mutex::new(HashMap::from([(0, Arc::clone(&first))])),
            first,
            ptx,
            segments,
            uuids,
        })
    }

    /// The GPU with `ordinal`, opened on first use.
    fn device(&self, ordinal: usize) -> Result<Arc<Device>, DeviceError> {
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = devices.get(&ordinal) {
            return Ok(Arc::clone(d));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver_err("context on an engine's GPU"))?;
        let device = Arc::new(Device::open(ctx, &self.ptx, &self.segments)?);
        devices.insert(ordinal, Arc::clone(&device));
        Ok(device)
    }

    /// The first GPU's context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.first.ctx
    }

    /// The stream [`CudaBackend::launch`] queues on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Device address (first GPU) of the pool byte at host address `host`, if the pool holds it.
    pub fn pool_device_address(&self, host: usize) -> Option<u64> {
        pool_device_address(&self.first.registered, host)
    }

    /// Queues one `kvtier_copy` of `args` on the first GPU's stream, after `after` (the engine's
    /// event) when given, and returns an event recorded behind it: nothing here waits on the
    /// GPU. The caller keeps both ends' memory valid until that event completed.
    pub fn launch(&self, args: &KernelArgs, after: Option<&CudaEvent>) -> Result<CudaEvent, DeviceError> {
        launch(&self.first.ctx, &self.stream, &self.first.copy, args, after)
    }

    /// The first GPU's name, for logs.
    pub fn device_name(&self) -> String {
        self.first.ctx.name().unwrap_or_default()
    }
}

/// The UUID of every visible GPU, by ordinal (as `cuDeviceGetUuid_v2` gives it to connectors).
fn gpu_uuids() -> Result<Vec<[u8; 16]>, DeviceError> {
    let count = CudaContext::device_count().map_err(driver_err("counting GPUs"))?;
    (0..count)
        .map(|i| {
            let mut dev: sys::CUdevice = 0;
            let mut uuid = sys::CUuuid { bytes: [0; 16] };
            // SAFETY: the driver is initialized (device_count); plain queries.
            unsafe {
                sys::cuDeviceGet(&mut dev, i).result().map_err(driver_err("listing GPUs"))?;
                sys::cuDeviceGetUuid_v2(&mut uuid, dev).result().map_err(driver_err("reading a GPU's UUID"))?;
            }
            Ok(uuid.bytes.map(|b| b as u8))
        })
        .collect()
}

fn launch(
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    copy: &CudaFunction,
    args: &KernelArgs,
    after: Option<&CudaEvent>,
) -> Result<CudaEvent, DeviceError> {
    if let Some(event) = after {
        stream.wait(event).map_err(driver_err("waiting on the engine's event"))?;
    }
    let done = ctx.new_event(None).map_err(driver_err("creating an event"))?;
    if let Some(args) = upload(stream, args)? {
        enqueue(stream, copy, &args)?; // freed behind the launch on the same stream
    }
    done.record(stream).map_err(driver_err("recording the copy's event"))?;
    Ok(done)
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
        let _ = self.first.ctx.bind_to_thread();
        for &(host, _) in &self.segments {
            // SAFETY: registered in `open`, still mapped.
            let _ = unsafe { sys::cuMemHostUnregister(host as *mut _) };
        }
    }
}

impl DeviceBackend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn offers_dma(&self) -> bool {
        true
    }

    fn import(&self, pid: Option<i32>, tensors: &[EngineTensor]) -> Result<Box<dyn EngineMemory>, DeviceError> {
        if tensors.iter().all(|t| t.ipc_handle.is_empty()) {
            // A CPU engine on a GPU node (tensors named by address): cross-memory attach.
            return super::CmaBackend.import(pid, tensors);
        }
        let uuid = tensors.first().map(|t| &t.device_uuid[..]).unwrap_or_default();
        if tensors.iter().any(|t| t.device_uuid != uuid) {
            return Err(DeviceError::Memory("the tensors of one KV cache are on different GPUs".into()));
        }
        let device = self.device(gpu_of(&self.uuids, uuid)?)?;
        Ok(Box::new(CudaMemory::open(&device.ctx, &device.copy, &device.registered, pid, tensors)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engines_name_their_gpu_by_uuid_whatever_its_index() {
        let uuids = [[1u8; 16], [2; 16], [3; 16]];
        assert_eq!(gpu_of(&uuids, &[3; 16]).unwrap(), 2);
        assert_eq!(gpu_of(&uuids, &[]).unwrap(), 0, "no UUID: the first GPU");
        let err = gpu_of(&uuids, &[9; 16]).unwrap_err().to_string();
        assert!(err.contains("0909") && err.contains("NVIDIA_VISIBLE_DEVICES"), "{err}");
        assert!(gpu_of(&uuids, &[1; 15]).is_err(), "a cut UUID matches nothing");
    }
}

/// Runs on a machine with an NVIDIA GPU (the `device` tool's); elsewhere it says it skipped.
#[cfg(test)]
mod gpu_tests {
    use super::IPC_HANDLE_BYTES;
    use super::*;
    use crate::device::gather::{kernel_args, Direction};
    use crate::device::layout::KvLayout;
    use crate::pool::{LockMode, PoolGeometry};
    use cudarc::driver::DevicePtr;
    use std::io::{BufRead, BufReader, Write};

    /// The engine's KV cache of the IPC test: FlashAttention layout, 4 layers, 64 blocks.
    fn ipc_layout() -> KvLayout {
        KvLayout::flash_attention(4, 64, 16 * 8 * 128 * 2)
    }

    fn pattern(t: usize, n: u64) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(13) ^ (t as u8) ^ (i >> 9) as u8).collect()
    }

    /// Saved from engine blocks SAVED, loaded back into engine blocks LOADED.
    const SAVED: [u64; 3] = [9, 3, 4];
    const LOADED: [u64; 3] = [20, 21, 22];

    fn hex(bytes: impl IntoIterator<Item = u8>) -> String {
        bytes.into_iter().map(|c| format!("{c:02x}")).collect()
    }

    fn unhex(hex: &str) -> Vec<u8> {
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
    }

    /// The engine process of the IPC test: allocates its KV tensors with cuMemAlloc (IPC-able),
    /// prints their handles and an interprocess event recorded behind its uploads; then, told the
    /// daemon's event behind the load, makes its stream wait on it and checks that exactly the
    /// loaded blocks changed, to the saved blocks' bytes.
    fn ipc_engine() {
        let layout = ipc_layout();
        let ctx = CudaContext::new(0).unwrap();
        ctx.bind_to_thread().unwrap();
        let mut tensors = Vec::new();
        for (t, &n) in layout.tensor_bytes.iter().enumerate() {
            let mut d: sys::CUdeviceptr = 0;
            let host = pattern(t, n);
            let mut h = sys::CUipcMemHandle_st { reserved: [0; IPC_HANDLE_BYTES] };
            // SAFETY: plain allocation, upload and handle export of our own memory.
            unsafe {
                sys::cuMemAlloc_v2(&mut d, n as usize).result().unwrap();
                sys::cuMemcpyHtoD_v2(d, host.as_ptr() as *const _, n as usize).result().unwrap();
                sys::cuIpcGetMemHandle(&mut h, d).result().unwrap();
            }
            println!("HANDLE {}", hex(h.reserved.iter().map(|&c| c as u8)));
            tensors.push(d);
        }
        let mut written: sys::CUevent = std::ptr::null_mut();
        let mut h = sys::CUipcEventHandle_st { reserved: [0; IPC_HANDLE_BYTES] };
        // SAFETY: an interprocess event of our own, recorded on the null stream behind the uploads.
        unsafe {
            sys::cuEventCreate(&mut written, 6).result().unwrap();
            sys::cuEventRecord(written, std::ptr::null_mut()).result().unwrap();
            sys::cuIpcGetEventHandle(&mut h, written).result().unwrap();
        }
        println!("EVENT {}", hex(h.reserved.iter().map(|&c| c as u8)));
        println!("READY");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).unwrap();
        let loaded = unhex(line.trim().strip_prefix("VERIFY ").unwrap());
        for (d, &s) in h.reserved.iter_mut().zip(&loaded) {
            *d = s as _;
        }
        let mut done: sys::CUevent = std::ptr::null_mut();
        // SAFETY: the daemon's event; the null stream waits on it before the downloads below.
        unsafe {
            sys::cuIpcOpenEventHandle(&mut done, h).result().unwrap();
            sys::cuStreamWaitEvent(std::ptr::null_mut(), done, 0).result().unwrap();
        }
        for (t, (&d, &n)) in tensors.iter().zip(&layout.tensor_bytes).enumerate() {
            let mut want = pattern(t, n);
            for (&from, &to) in SAVED.iter().zip(&LOADED) {
                for part in 0..2 {
                    let at = |b: u64| ((part * 64 + b) * layout.chunk_bytes) as usize;
                    want.copy_within(at(from)..at(from) + layout.chunk_bytes as usize, at(to));
                }
            }
            let mut got = vec![0u8; n as usize];
            // SAFETY: downloads our own allocation.
            unsafe { sys::cuMemcpyDtoH_v2(got.as_mut_ptr() as *mut _, d, n as usize) }.result().unwrap();
            println!("{}", if got == want { "VERIFIED".to_string() } else { format!("MISMATCH in tensor {t}") });
        }
    }

    #[test]
    fn engine_tensors_of_another_process_save_and_load_through_ipc_handles() {
        if std::env::var_os("KVTIER_IPC_ENGINE").is_some() {
            return ipc_engine();
        }
        if !driver_present() || !nvrtc_present() {
            eprintln!("skipped: no CUDA driver and NVRTC on this machine");
            return;
        }
        let name = "device::cuda::gpu_tests::engine_tensors_of_another_process_save_and_load_through_ipc_handles";
        let mut engine = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture", "--test-threads", "1"])
            .env("KVTIER_IPC_ENGINE", "1")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(engine.stdout.take().unwrap()).lines().map(Result::unwrap);
        let layout = ipc_layout();
        let (mut tensors, mut written) = (Vec::new(), Vec::new());
        // The engine's first line follows the test harness's "test NAME ... " (no newline).
        for line in lines.by_ref() {
            if line.ends_with("READY") {
                break;
            }
            if let Some((_, handle)) = line.split_once("HANDLE ") {
                let bytes = layout.tensor_bytes[tensors.len()];
                tensors.push(EngineTensor { ipc_handle: unhex(handle), bytes, ..Default::default() });
            }
            if let Some((_, event)) = line.split_once("EVENT ") {
                written = unhex(event);
            }
        }
        assert_eq!(tensors.len(), layout.tensor_bytes.len(), "the engine exported every tensor");
        let pool =
            HostPool::create(PoolGeometry::plan(64 << 20, 64 << 20, 4 << 20).unwrap(), false, LockMode::BestEffort)
                .unwrap();
        let backend = CudaBackend::open(&pool).unwrap();
        let memory = backend.import(None, &tensors).expect("IPC handles open");
        let base = pool.segments()[0].as_ptr() as u64;
        let slots: Vec<u64> = (0..3).map(|k| base + k * layout.block_bytes()).collect();
        let save: Vec<(u64, u64)> = SAVED.iter().copied().zip(slots.iter().copied()).collect();
        let saved = memory.queue(&layout.plan(&save).unwrap(), Direction::ToPool, &written).unwrap();
        assert_eq!(saved.event.len(), IPC_HANDLE_BYTES, "the copy is followed by an event the engine can open");
        (saved.wait)().unwrap();
        // SAFETY: the copy completed; the pool is ours.
        let pooled = unsafe { std::slice::from_raw_parts(base as *const u8, 3 * layout.block_bytes() as usize) };
        for s in layout.plan(&save).unwrap() {
            let at = (s.pool_offset - base) as usize;
            let want = &pattern(s.tensor as usize, layout.tensor_bytes[s.tensor as usize])
                [s.engine_offset as usize..(s.engine_offset + s.bytes) as usize];
            assert!(&pooled[at..at + s.bytes as usize] == want, "pool holds the engine's chunk {s:?}");
        }
        let load: Vec<(u64, u64)> = LOADED.iter().copied().zip(slots.iter().copied()).collect();
        // The engine's stream waits for the load's event; the daemon does not wait before telling it.
        let loaded = memory.queue(&layout.plan(&load).unwrap(), Direction::ToEngine, &written).unwrap();
        writeln!(engine.stdin.as_mut().unwrap(), "VERIFY {}", hex(loaded.event.iter().copied())).unwrap();
        let verdicts: Vec<&str> = (lines.filter(|l| l.ends_with("VERIFIED") || l.contains("MISMATCH")))
            .map(|l| if l.ends_with("VERIFIED") { "VERIFIED" } else { "MISMATCH" })
            .collect();
        assert_eq!(verdicts, vec!["VERIFIED"; 4], "the engine sees exactly the loaded blocks");
        assert!(engine.wait().unwrap().success());
        (loaded.wait)().unwrap();
        let err = backend.import(None, &[EngineTensor { ipc_handle: vec![0; 8], bytes: 1, ..Default::default() }]);
        assert!(err.is_err(), "a malformed handle is refused");
    }

    #[test]
    fn gather_and_scatter_through_the_pool_on_a_real_gpu() {
        if !driver_present() || !nvrtc_present() {
            eprintln!("skipped: no CUDA driver and NVRTC on this machine");
            return;
        }
        let pool =
            HostPool::create(PoolGeometry::plan(64 << 20, 64 << 20, 4 << 20).unwrap(), false, LockMode::BestEffort)
                .unwrap();
        let backend = CudaBackend::open(&pool).expect("CUDA backend opens: context, pool registered, kernel compiled");
        let layout = KvLayout::flash_attention(4, 64, 16 * 8 * 128 * 2 + 16);
        layout.validate().unwrap();
        let stream = backend.stream().clone();
        let pattern: Vec<Vec<u8>> = (layout.tensor_bytes.iter().enumerate())
            .map(|(t, &n)| (0..n).map(|i| (i as u8).wrapping_mul(13) ^ (t as u8) ^ (i >> 9) as u8).collect())
            .collect();
        let mut tensors: Vec<_> = pattern.iter().map(|p| stream.clone_htod(p).unwrap()).collect();
        let bases: Vec<u64> = tensors.iter().map(|t| t.device_ptr(&stream).0).collect();
        let seg = &pool.segments()[0];
        let slot = |k: u64| backend.pool_device_address(seg.as_ptr() as usize).unwrap() + k * layout.block_bytes();
        let blocks: Vec<(u64, u64)> =
            [9u64, 3, 4, 63, 0].iter().enumerate().map(|(k, &b)| (b, slot(k as u64))).collect();
        let plan = layout.plan(&blocks).unwrap();
        let save = kernel_args(&plan, &bases, Direction::ToPool, 64 << 10).unwrap();
        backend.launch(&save, None).unwrap().synchronize().unwrap();
        // Every chunk in the pool equals the engine chunk the layout names.
        // SAFETY: the copy above completed (its event synchronized).
        let pooled = unsafe { std::slice::from_raw_parts(seg.as_ptr(), 5 * layout.block_bytes() as usize) };
        for s in &plan {
            let at = (s.pool_offset - slot(0)) as usize;
            let from = s.engine_offset as usize;
            assert!(pooled[at..at + s.bytes as usize] == pattern[s.tensor as usize][from..from + s.bytes as usize]);
        }
        // Scatter back into zeroed tensors: the saved blocks return, nothing else is touched.
        for t in tensors.iter_mut() {
            stream.memset_zeros(t).unwrap();
        }
        let before = backend.context().new_event(None).unwrap();
        before.record(&stream).unwrap();
        let load = kernel_args(&plan, &bases, Direction::ToEngine, 64 << 10).unwrap();
        backend.launch(&load, Some(&before)).unwrap().synchronize().unwrap();
        for (t, dev) in tensors.iter().enumerate() {
            let got = stream.clone_dtoh(dev).unwrap();
            let mut want = vec![0u8; got.len()];
            for s in plan.iter().filter(|s| s.tensor as usize == t) {
                let r = s.engine_offset as usize..(s.engine_offset + s.bytes) as usize;
                want[r.clone()].copy_from_slice(&pattern[t][r]);
            }
            assert!(got == want, "tensor {t} holds exactly the loaded blocks");
        }
    }
}
