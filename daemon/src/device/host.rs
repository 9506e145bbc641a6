//! The host backend: the daemon never touches engine memory; connectors copy between their KV
//! tensors and their mapping of the pool (received over the socket with SCM_RIGHTS).

use super::DeviceBackend;

/// Connectors copy; nothing to open.
pub struct HostBackend;

impl DeviceBackend for HostBackend {
    fn name(&self) -> &'static str {
        "host"
    }

    fn offers_dma(&self) -> bool {
        false
    }
}
