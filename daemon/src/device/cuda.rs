//! The CUDA backend (cudarc, driver API loaded at run time: no CUDA needed to build).
//!
//! Opening it checks that `libcuda` and NVRTC are present (cudarc panics on a missing library, so
//! this is checked first), creates a context on device 0, page-locks the pool with
//! `cuMemHostRegister` so the GPU can DMA to and from it, and compiles the gather/scatter kernel
//! (`kernel.cu`) with NVRTC. The engine-memory data path (IPC handles, kernel launches ordered by
//! IPC events) builds on this; see `docs/gpu.md` for what is verified where.

use super::{DeviceBackend, DeviceError};
use crate::pool::HostPool;
use cudarc::driver::{sys, CudaContext, CudaFunction};
use std::sync::Arc;

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
    _copy: CudaFunction,
    registered: Vec<usize>,
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
        let mut registered = Vec::new();
        for seg in pool.segments() {
            let flags = sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP;
            // SAFETY: the segment is mapped for the daemon's life; unregistered on drop.
            unsafe { sys::cuMemHostRegister_v2(seg.as_ptr().cast(), seg.len() as usize, flags) }
                .result()
                .map_err(driver_err("cuMemHostRegister of the pool"))?;
            registered.push(seg.as_ptr() as usize);
        }
        let ptx = cudarc::nvrtc::compile_ptx(KERNEL_SOURCE)
            .map_err(|e| DeviceError::Driver(format!("NVRTC compiling the copy kernel: {e:?}")))?;
        let module = ctx.load_module(ptx).map_err(driver_err("loading the copy kernel"))?;
        let copy = module.load_function("kvtier_copy").map_err(driver_err("finding kvtier_copy"))?;
        Ok(Self { ctx, _copy: copy, registered })
    }

    /// The device's name, for logs.
    pub fn device_name(&self) -> String {
        self.ctx.name().unwrap_or_default()
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        for &p in &self.registered {
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
