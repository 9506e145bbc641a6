//! Device backends: how blocks move between an engine's KV memory and the pool.
//!
//! `host`: the connector copies through its own mapping of the pool (CPU engines, and GPU engines
//! without a backend). `cma`: the daemon copies CPU engines' KV tensors itself, many blocks and
//! layers per system call (process_vm_readv/writev). `cuda` and `rocm` load their driver at run
//! time (so the daemon builds and runs on machines without one) and refuse to start, with a
//! message saying what is missing, when it is not there. [`layout`] is the pure index math for
//! vLLM's KV layouts that every daemon-side copy executes.

mod cma;
pub mod cuda;
pub mod gather;
mod host;
pub mod layout;
mod process;
pub mod rocm;

use crate::pool::HostPool;
use gather::Direction;
use layout::Segment;
use serde::{Deserialize, Serialize};

pub use cma::CmaBackend;
pub use host::HostBackend;

/// Why a backend could not be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    /// The driver library is not on this machine.
    #[error("{0}")]
    NoDriver(String),
    /// The driver is there but refused (no device, init failed, registration failed).
    #[error("{0}")]
    Driver(String),
    /// Engine memory that cannot be reached or copied (gone, unmapped, not permitted).
    #[error("{0}")]
    Memory(String),
}

/// The backends a daemon can be configured with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// Connectors copy through the shared pool mapping.
    Host,
    /// The daemon copies CPU engines' KV memory itself (cross-memory attach).
    Cma,
    /// NVIDIA GPUs through the CUDA driver API (libcuda, NVRTC).
    Cuda,
    /// AMD GPUs through HIP (libamdhip64, hiprtc).
    Rocm,
    /// CUDA if its driver is present, else ROCm if present, else cma (the default).
    Auto,
}

/// A way to move blocks between engine memory and the pool.
pub trait DeviceBackend: Send + Sync {
    /// Name as in config and in the Hello reply.
    fn name(&self) -> &'static str;
    /// Whether the daemon copies engine memory itself (DMA); otherwise the connector copies.
    fn offers_dma(&self) -> bool;
    /// Opens the KV tensors that engine process `pid` (as SO_PEERCRED names it) registered, for
    /// [`EngineMemory::copy`]. Backends without daemon-side copies refuse.
    fn import(&self, pid: Option<i32>, tensors: &[EngineTensor]) -> Result<Box<dyn EngineMemory>, DeviceError> {
        let _ = (pid, tensors);
        Err(DeviceError::Memory(format!("device backend \"{}\" does not copy engine memory", self.name())))
    }
}

/// One engine KV tensor as a connector registers it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineTensor {
    /// Address in the engine process (host-memory engines).
    pub address: u64,
    /// IPC memory handle of the allocation holding it (GPU engines).
    pub ipc_handle: Vec<u8>,
    /// Byte offset of the tensor in that allocation.
    pub ipc_offset: u64,
    /// Size in bytes.
    pub bytes: u64,
    /// UUID of the GPU holding it (GPU engines; empty: the daemon's first GPU).
    pub device_uuid: Vec<u8>,
}

/// An engine's registered KV tensors, opened by a backend.
pub trait EngineMemory: Send + Sync {
    /// Executes `plan` (engine tensor offsets; pool side as the daemon's host addresses of pool
    /// bytes) in direction `dir`, returning once every byte has been copied. On error, part of
    /// the plan may have been copied.
    fn copy(&self, plan: &[Segment], dir: Direction) -> Result<(), DeviceError>;

    /// Queues `plan` behind the engine's event `after` (an IPC event handle; empty: none) and
    /// returns without waiting for the copy. Backends that copy on the CPU copy now and refuse
    /// events.
    fn queue(&self, plan: &[Segment], dir: Direction, after: &[u8]) -> Result<Queued, DeviceError> {
        if !after.is_empty() {
            return Err(DeviceError::Memory("this device backend does not take engine events".into()));
        }
        self.copy(plan, dir)?;
        Ok(Queued::done())
    }
}

/// A copy queued by [`EngineMemory::queue`].
pub struct Queued {
    /// IPC handle of an event recorded behind the copy, for the engine's stream to wait on
    /// (empty: the copy is done already).
    pub event: Vec<u8>,
    /// Blocks until the copy has completed (or failed).
    pub wait: Box<dyn FnOnce() -> Result<(), DeviceError> + Send>,
}

impl Queued {
    /// A copy that completed before it was returned.
    pub fn done() -> Self {
        Self { event: Vec::new(), wait: Box::new(|| Ok(())) }
    }
}

/// Opens the configured backend over `pool`.
pub fn open(kind: BackendKind, pool: &HostPool) -> Result<Box<dyn DeviceBackend>, DeviceError> {
    match kind {
        BackendKind::Host => Ok(Box::new(HostBackend)),
        BackendKind::Cma => Ok(Box::new(CmaBackend)),
        BackendKind::Cuda => Ok(Box::new(cuda::CudaBackend::open(pool)?)),
        BackendKind::Rocm => Ok(Box::new(rocm::RocmBackend::open(pool)?)),
        BackendKind::Auto => cuda::CudaBackend::open(pool)
            .map(|b| Box::new(b) as Box<dyn DeviceBackend>)
            .or_else(|_| rocm::RocmBackend::open(pool).map(|b| Box::new(b) as Box<dyn DeviceBackend>))
            .or_else(|_| Ok(Box::new(CmaBackend))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{LockMode, PoolGeometry};

    fn pool() -> HostPool {
        HostPool::create(PoolGeometry::plan(1 << 20, 1 << 20, 1 << 20).unwrap(), false, LockMode::BestEffort).unwrap()
    }

    #[test]
    fn host_is_always_there_and_never_dmas() {
        let b = open(BackendKind::Host, &pool()).unwrap();
        assert_eq!((b.name(), b.offers_dma()), ("host", false));
    }

    #[test]
    fn missing_drivers_are_named_and_auto_falls_back() {
        let pool = pool();
        if !cuda::driver_present() {
            let err = open(BackendKind::Cuda, &pool).err().expect("refused");
            assert!(matches!(&err, DeviceError::NoDriver(m) if m.contains("libcuda.so.1")), "{err}");
        }
        if !rocm::driver_present() {
            let err = open(BackendKind::Rocm, &pool).err().expect("refused");
            assert!(matches!(&err, DeviceError::NoDriver(m) if m.contains("libamdhip64")), "{err}");
        }
        if !cuda::driver_present() && !rocm::driver_present() {
            assert_eq!(open(BackendKind::Auto, &pool).unwrap().name(), "cma");
        }
    }

    #[test]
    fn the_copy_kernel_names_its_entry_point() {
        assert!(cuda::KERNEL_SOURCE.contains("extern \"C\" __global__ void kvtier_copy("));
    }
}
