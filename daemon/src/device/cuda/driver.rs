//! CUDA driver helpers shared by the backend (`mod.rs`) and the IPC-opened engine memory
//! (`ipc.rs`): library checks, error mapping, pool addresses and the copy kernel's launch.

use super::super::gather::KernelArgs;
use super::super::DeviceError;
use cudarc::driver::{sys, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Threads per thread block of `kvtier_copy` (each block copies one piece).
const THREADS: u32 = 256;

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

/// Registered pool segments: (host address, bytes, device address).
pub(in crate::device) type Registered = Arc<Vec<(usize, usize, u64)>>;

/// Maps a driver error to a [`DeviceError`] naming `what` was being done.
pub(in crate::device) fn driver_err(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> DeviceError + '_ {
    move |e| DeviceError::Driver(format!("CUDA {what}: {e:?}"))
}

/// The device address of pool byte `host`, if it lies in a registered segment.
pub(in crate::device) fn pool_device_address(registered: &[(usize, usize, u64)], host: usize) -> Option<u64> {
    let &(base, _, device) = registered.iter().find(|&&(b, l, _)| host >= b && host < b + l)?;
    Some(device + (host - base) as u64)
}

/// A copy's arguments on the device; they must outlive the launch that reads them.
pub(in crate::device) struct Uploaded {
    /// `KernelArgs::packed`.
    packed: CudaSlice<u64>,
    segments: usize,
}

/// Uploads `args` on stream `upload` (one copy); None for an empty plan. From pageable memory the
/// driver returns once the bytes are staged, i.e. once `upload` reaches the copy: give it a stream
/// with nothing queued behind another process's event, or this thread waits for that process.
pub(in crate::device) fn upload(upload: &Arc<CudaStream>, args: &KernelArgs) -> Result<Option<Uploaded>, DeviceError> {
    if args.is_empty() {
        return Ok(None);
    }
    let packed = upload.clone_htod(&args.packed()).map_err(driver_err("uploading copy arguments"))?;
    Ok(Some(Uploaded { packed, segments: args.len() }))
}

/// Queues one `kvtier_copy` of uploaded arguments on `stream`, which must be ordered after their
/// upload.
pub(in crate::device) fn enqueue(
    stream: &Arc<CudaStream>,
    copy: &CudaFunction,
    args: &Uploaded,
) -> Result<(), DeviceError> {
    let cfg = LaunchConfig { grid_dim: (args.segments as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let n = args.segments as i32;
    let mut launch = stream.launch_builder(copy);
    launch.arg(&args.packed).arg(&n);
    // SAFETY: the kernel's signature is (u64* packed arguments, int segments); the addresses are
    // the caller's engine memory and our registered pool, valid until the caller's event behind
    // the launch completes.
    unsafe { launch.launch(cfg) }.map_err(driver_err("launching kvtier_copy"))?;
    Ok(())
}
