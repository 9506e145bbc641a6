//! The CUDA backend (cudarc, driver API loaded at run time: no CUDA needed to build).
//!
//! Opening it checks that `libcuda` and NVRTC are present (cudarc panics on a missing library, so
//! this is checked first), creates a context on device 0, page-locks the pool with
//! `cuMemHostRegister` so the GPU can DMA to and from it, and compiles the gather/scatter kernel
//! (`kernel.cu`) with NVRTC. The engine-memory data path (IPC handles, kernel launches ordered by
//! IPC events) builds on this; see `docs/gpu.md` for what is verified where.

use super::gather::KernelArgs;
use super::{DeviceBackend, DeviceError};
use crate::pool::HostPool;
use cudarc::driver::{sys, CudaContext, CudaEvent, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Threads per thread block of `kvtier_copy` (each block copies one piece).
const THREADS: u32 = 256;

/// The CUDA bindings this backend uses (for benchmarks and tools built on it).
pub use cudarc;

/// Source of the gather/scatter kernel, compiled at run time.
pub const KERNEL_SOURCE: &str = include_str!("kernel.cu");

/// Whether the CUDA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to load the library; no CUDA call is made.
    unsafe { sys::is_culib_present() }
}

/// Whether NVRTC (the run-time compiler) can be loaded on this machine.
pub fn nvrtc_present() -> bool {
    // SAFETY: as above.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// An open CUDA device with the pool registered and the copy kernel loaded.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    copy: CudaFunction,
    /// Registered pool segments: (host address, bytes, device address).
    registered: Vec<(usize, usize, u64)>,
}

fn driver_err(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> DeviceError + '_ {
    move |e| DeviceError::Driver(format!("CUDA {what}: {e:?}"))
}

impl CudaBackend {
    /// Opens device 0, registers the pool's segments, compiles the kernel; refuses with a clear
    /// message when the driver or NVRTC is missing.
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
        let mut backend = Self {
            stream: ctx.new_stream().map_err(driver_err("creating a stream"))?,
            copy: Self::compile(&ctx)?,
            ctx,
            registered: Vec::new(),
        };
        for seg in pool.segments() {
            let (host, len) = (seg.as_ptr() as usize, seg.len() as usize);
            let flags = sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP;
            // SAFETY: the segment is mapped for the daemon's life; unregistered on drop.
            unsafe { sys::cuMemHostRegister_v2(host as *mut _, len, flags) }
                .result()
                .map_err(driver_err("cuMemHostRegister of the pool"))?;
            let mut device: sys::CUdeviceptr = 0;
            // SAFETY: `host` was registered with DEVICEMAP just above (kept for unregistering).
            let mapped = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device, host as *mut _, 0) }.result();
            backend.registered.push((host, len, device));
            mapped.map_err(driver_err("cuMemHostGetDevicePointer of the pool"))?;
        }
        Ok(backend)
    }

    fn compile(ctx: &Arc<CudaContext>) -> Result<CudaFunction, DeviceError> {
        let ptx = cudarc::nvrtc::compile_ptx(KERNEL_SOURCE)
            .map_err(|e| DeviceError::Driver(format!("NVRTC compiling the copy kernel: {e:?}")))?;
        let module = ctx.load_module(ptx).map_err(driver_err("loading the copy kernel"))?;
        module.load_function("kvtier_copy").map_err(driver_err("finding kvtier_copy"))
    }

    /// The context (device 0).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream copies run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Device address of the pool byte at host address `host`, if the pool holds it.
    pub fn pool_device_address(&self, host: usize) -> Option<u64> {
        let &(base, _, device) = self.registered.iter().find(|&&(b, l, _)| host >= b && host < b + l)?;
        Some(device + (host - base) as u64)
    }

    /// Queues one `kvtier_copy` of `args` on the backend's stream, after `after` (the engine's
    /// event) when given, and returns an event recorded behind it: nothing here waits on the
    /// GPU. The caller keeps both ends' memory valid until that event completed.
    pub fn launch(&self, args: &KernelArgs, after: Option<&CudaEvent>) -> Result<CudaEvent, DeviceError> {
        if let Some(event) = after {
            self.stream.wait(event).map_err(driver_err("waiting on the engine's event"))?;
        }
        let done = self.ctx.new_event(None).map_err(driver_err("creating an event"))?;
        if !args.is_empty() {
            let upload = |v: &Vec<u64>| self.stream.clone_htod(v).map_err(driver_err("uploading copy arguments"));
            let (src, dst, bytes) = (upload(&args.src)?, upload(&args.dst)?, upload(&args.bytes)?);
            let n = args.len() as i32;
            let cfg =
                LaunchConfig { grid_dim: (args.len() as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
            let mut launch = self.stream.launch_builder(&self.copy);
            launch.arg(&src).arg(&dst).arg(&bytes).arg(&n);
            // SAFETY: the kernel's signature is (u64*, u64*, u64*, int); the addresses are the
            // caller's engine memory and our registered pool, valid until `done` completes.
            unsafe { launch.launch(cfg) }.map_err(driver_err("launching kvtier_copy"))?;
        }
        done.record(&self.stream).map_err(driver_err("recording the copy's event"))?;
        Ok(done)
    }

    /// The device's name, for logs.
    pub fn device_name(&self) -> String {
        self.ctx.name().unwrap_or_default()
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
        for &(p, _, _) in &self.registered {
            // SAFETY: registered in `open`, still mapped.
            let _ = unsafe { sys::cuMemHostUnregister(p as *mut _) };
        }
    }
}

impl DeviceBackend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn offers_dma(&self) -> bool {
        // The IPC data path is not wired into the protocol yet: connectors keep copying.
        false
    }
}

/// Runs on a machine with an NVIDIA GPU (the `device` tool's); elsewhere it says it skipped.
#[cfg(test)]
mod gpu_tests {
    use super::*;
    use crate::device::gather::{kernel_args, Direction};
    use crate::device::layout::KvLayout;
    use crate::pool::{LockMode, PoolGeometry};
    use cudarc::driver::DevicePtr;

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
        let before = backend.ctx.new_event(None).unwrap();
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
