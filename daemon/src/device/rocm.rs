//! The ROCm backend (cubecl-hip-sys: libamdhip64 and hiprtc are loaded at run time, so no ROCm is
//! needed to build). Opening it checks that the HIP libraries load, initializes HIP and
//! page-locks the pool with `hipHostRegister`. CPU engines' KV is copied as `cma` copies it; GPU
//! engines' connectors copy through the pool.

use super::{DeviceBackend, DeviceError, EngineMemory, EngineTensor};
use crate::pool::HostPool;

/// Whether libamdhip64 and hiprtc can be loaded on this machine.
pub fn driver_present() -> bool {
    cubecl_hip_sys::is_available()
}

/// An initialized HIP runtime with the pool registered.
pub struct RocmBackend {
    registered: Vec<usize>,
}

impl RocmBackend {
    /// Initializes HIP and registers the pool; refuses with a clear message without ROCm.
    pub fn open(pool: &HostPool) -> Result<Self, DeviceError> {
        if !driver_present() {
            return Err(DeviceError::NoDriver(
                "device.backend = \"rocm\" needs ROCm's libamdhip64.so and libhiprtc.so, which are not on this \
                 machine; use \"host\" (or \"auto\")"
                    .into(),
            ));
        }
        // SAFETY: the libraries are present (checked above); plain C calls.
        let rc = unsafe { cubecl_hip_sys::hipInit(0) };
        if rc != cubecl_hip_sys::hipError_t_hipSuccess {
            return Err(DeviceError::Driver(format!("hipInit failed: error {rc}")));
        }
        let mut registered = Vec::new();
        for seg in pool.segments() {
            // SAFETY: the segment is mapped for the daemon's life; unregistered on drop.
            let rc = unsafe {
                cubecl_hip_sys::hipHostRegister(
                    seg.as_ptr().cast(),
                    seg.len() as usize,
                    cubecl_hip_sys::hipHostRegisterPortable,
                )
            };
            if rc != cubecl_hip_sys::hipError_t_hipSuccess {
                return Err(DeviceError::Driver(format!("hipHostRegister of the pool failed: error {rc}")));
            }
            registered.push(seg.as_ptr() as usize);
        }
        Ok(Self { registered })
    }
}

impl Drop for RocmBackend {
    fn drop(&mut self) {
        for &p in &self.registered {
            // SAFETY: registered in `open`, still mapped.
            let _ = unsafe { cubecl_hip_sys::hipHostUnregister(p as *mut _) };
        }
    }
}

impl DeviceBackend for RocmBackend {
    fn name(&self) -> &'static str {
        "rocm"
    }

    fn offers_dma(&self) -> bool {
        true
    }

    /// CPU engines' tensors (by address) are copied as `cma` copies them; GPU engines' IPC copies
    /// are not written for ROCm (no AMD GPU has been available to verify them): refused, so the
    /// connector copies through the pool.
    fn import(&self, pid: Option<i32>, tensors: &[EngineTensor]) -> Result<Box<dyn EngineMemory>, DeviceError> {
        if tensors.iter().all(|t| t.ipc_handle.is_empty()) {
            return super::CmaBackend.import(pid, tensors);
        }
        Err(DeviceError::Memory("device backend \"rocm\" does not copy GPU memory yet (HIP IPC)".into()))
    }
}
