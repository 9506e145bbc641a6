//! Registered memory and remote keys: what RMA reads and writes.

use crate::{check, sys, Context, Endpoint, Result};
use std::ptr;
use std::sync::Arc;

/// Memory registered with a context (pinned for the transports), and its packed remote key.
pub struct Region {
    pub(crate) memh: sys::ucp_mem_h,
    ctx: Arc<Context>,
    addr: usize,
    len: usize,
}

// SAFETY: a memory handle is a context-level object.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Region {
    /// Registers `len` bytes at `addr`.
    ///
    /// # Safety
    /// The memory must stay mapped until the region is dropped.
    pub unsafe fn map(ctx: &Arc<Context>, addr: *mut u8, len: usize) -> Result<Self> {
        let mut params: sys::ucp_mem_map_params_t = std::mem::zeroed();
        params.field_mask = (sys::ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_ADDRESS
            | sys::ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_LENGTH) as u64;
        params.address = addr.cast();
        params.length = len;
        let mut memh: sys::ucp_mem_h = ptr::null_mut();
        check("ucp_mem_map", sys::ucp_mem_map(ctx.raw, &params, &mut memh))?;
        Ok(Self { memh, ctx: Arc::clone(ctx), addr: addr as usize, len })
    }

    /// The remote key a peer unpacks to read or write this region.
    pub fn pack_rkey(&self) -> Result<Vec<u8>> {
        // SAFETY: the buffer is copied out and released.
        unsafe {
            let mut buf: *mut std::ffi::c_void = ptr::null_mut();
            let mut size = 0usize;
            check("ucp_rkey_pack", sys::ucp_rkey_pack(self.ctx.raw, self.memh, &mut buf, &mut size))?;
            let out = std::slice::from_raw_parts(buf as *const u8, size).to_vec();
            sys::ucp_rkey_buffer_release(buf);
            Ok(out)
        }
    }

    /// Start address of the region (what a peer passes as the remote address, plus an offset).
    pub fn address(&self) -> u64 {
        self.addr as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether `len` bytes at `addr` lie inside this region.
    pub fn holds(&self, addr: usize, len: usize) -> bool {
        addr >= self.addr && addr + len <= self.addr + self.len
    }

    /// True for an empty region.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: registered in `map`.
        unsafe {
            sys::ucp_mem_unmap(self.ctx.raw, self.memh);
        }
    }
}

/// A peer's remote key, unpacked for one endpoint.
pub struct RemoteKey {
    pub(crate) raw: sys::ucp_rkey_h,
}

// SAFETY: used with its endpoint's worker, one thread at a time.
unsafe impl Send for RemoteKey {}

impl RemoteKey {
    /// Unpacks `packed` (from [`Region::pack_rkey`]) for use on `ep`.
    pub fn unpack(ep: &Endpoint, packed: &[u8]) -> Result<Self> {
        let mut raw: sys::ucp_rkey_h = ptr::null_mut();
        // SAFETY: valid endpoint and buffer.
        check("ucp_ep_rkey_unpack", unsafe { sys::ucp_ep_rkey_unpack(ep.raw, packed.as_ptr().cast(), &mut raw) })?;
        Ok(Self { raw })
    }
}

impl Drop for RemoteKey {
    fn drop(&mut self) {
        // SAFETY: unpacked in `unpack`.
        unsafe { sys::ucp_rkey_destroy(self.raw) }
    }
}
