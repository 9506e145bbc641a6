//! Endpoints: a connection to a peer worker, with RMA put/get and flush.

use crate::{check, status_ptr, sys, RemoteKey, Result, Worker};
use std::ptr;

/// A connection from one worker to a peer worker.
pub struct Endpoint {
    pub(crate) raw: sys::ucp_ep_h,
}

// SAFETY: used with its worker, one thread at a time.
unsafe impl Send for Endpoint {}

/// Called by UCX when an endpoint fails (its operations complete with the error too): queues the
/// endpoint for [`Worker::take_failed_endpoints`].
unsafe extern "C" fn failed(ops: *mut std::ffi::c_void, ep: sys::ucp_ep_h, _: sys::ucs_status_t) {
    // SAFETY: `ops` is the worker's queue, which outlives its endpoints' callbacks.
    let ops = unsafe { &*ops.cast::<std::cell::RefCell<crate::tagged::Ops>>() };
    ops.borrow_mut().failed.push(ep as usize);
}

/// Waits for a request by progressing `workers` (all of them: over emulated transports the peer
/// must progress too when it lives on this thread), then frees it.
fn wait(call: &'static str, req: Option<sys::ucs_status_ptr_t>, workers: &[&Worker]) -> Result<()> {
    let Some(req) = req else { return Ok(()) };
    loop {
        // SAFETY: `req` is a live request until freed below.
        let status = unsafe { sys::ucp_request_check_status(req) };
        if status != sys::ucs_status_t_UCS_INPROGRESS {
            unsafe { sys::ucp_request_free(req) };
            return check(call, status);
        }
        for w in workers {
            w.progress();
        }
    }
}

impl Endpoint {
    pub(crate) fn connect(worker: &Worker, remote: &[u8], detect_peer_failure: bool) -> Result<Self> {
        let mut params = Self::params(worker, detect_peer_failure);
        params.field_mask |= sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_REMOTE_ADDRESS as u64;
        params.address = remote.as_ptr().cast();
        // SAFETY: the address bytes outlive the call (UCX copies what it needs).
        unsafe { Self::create(worker, &params) }
    }

    /// Endpoint parameters of `worker` with the error handling mode set (and, for PEER, a
    /// handler queuing failures on the worker).
    pub(crate) fn params(worker: &Worker, detect_peer_failure: bool) -> sys::ucp_ep_params_t {
        // SAFETY: all-zero is a valid parameter block; the fields set are named in the mask.
        let mut params: sys::ucp_ep_params_t = unsafe { std::mem::zeroed() };
        params.field_mask = sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE as u64;
        params.err_mode = sys::ucp_err_handling_mode_t_UCP_ERR_HANDLING_MODE_NONE;
        if detect_peer_failure {
            params.err_mode = sys::ucp_err_handling_mode_t_UCP_ERR_HANDLING_MODE_PEER;
            params.field_mask |= sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_ERR_HANDLER as u64;
            let ops: *const std::cell::RefCell<crate::tagged::Ops> = &*worker.ops;
            params.err_handler = sys::ucp_err_handler_t { cb: Some(failed), arg: ops.cast_mut().cast() };
        }
        params
    }

    /// Creates an endpoint of `worker` from `params`.
    ///
    /// # Safety
    /// What `params` points at must be valid for the call.
    pub(crate) unsafe fn create(worker: &Worker, params: &sys::ucp_ep_params_t) -> Result<Self> {
        let mut raw: sys::ucp_ep_h = ptr::null_mut();
        // SAFETY: valid worker; the caller vouches for the parameters.
        check("ucp_ep_create", unsafe { sys::ucp_ep_create(worker.raw, params, &mut raw) })?;
        Ok(Self { raw })
    }

    /// What identifies this endpoint in [`Worker::take_failed_endpoints`].
    pub fn id(&self) -> usize {
        self.raw as usize
    }

    fn param() -> sys::ucp_request_param_t {
        // SAFETY: all-zero is "no callback, no user data, contiguous datatype".
        unsafe { std::mem::zeroed() }
    }

    /// Writes `local` to the peer's `remote_addr` (inside a region whose key is `rkey`) and
    /// waits for local completion, progressing `workers`.
    pub fn put(&self, local: &[u8], remote_addr: u64, rkey: &RemoteKey, workers: &[&Worker]) -> Result<()> {
        let param = Self::param();
        // SAFETY: `local` outlives the wait below.
        let p =
            unsafe { sys::ucp_put_nbx(self.raw, local.as_ptr().cast(), local.len(), remote_addr, rkey.raw, &param) };
        wait("ucp_put_nbx", status_ptr("ucp_put_nbx", p)?, workers)
    }

    /// Reads the peer's `remote_addr` into `local`, waiting for completion.
    pub fn get(&self, local: &mut [u8], remote_addr: u64, rkey: &RemoteKey, workers: &[&Worker]) -> Result<()> {
        let param = Self::param();
        // SAFETY: `local` outlives the wait below.
        let p = unsafe {
            sys::ucp_get_nbx(self.raw, local.as_mut_ptr().cast(), local.len(), remote_addr, rkey.raw, &param)
        };
        wait("ucp_get_nbx", status_ptr("ucp_get_nbx", p)?, workers)
    }

    /// Reads many ranges at once: `(local address, length, remote address, key)` each. All are
    /// issued before waiting, so the transport keeps them in flight together; the first error is
    /// returned after every one has finished.
    ///
    /// # Safety
    /// Each local range must be writable memory (registered for zero-copy) that nobody else
    /// touches until this returns.
    pub unsafe fn get_many(&self, ops: &[(usize, usize, u64, &RemoteKey)], workers: &[&Worker]) -> Result<()> {
        let param = Self::param();
        let mut pending = Vec::new();
        let mut first_err = None;
        for &(local, len, remote, rkey) in ops {
            let p = sys::ucp_get_nbx(self.raw, local as *mut _, len, remote, rkey.raw, &param);
            match status_ptr("ucp_get_nbx", p) {
                Ok(Some(req)) => pending.push(req),
                Ok(None) => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                    break;
                }
            }
        }
        for req in pending {
            if let Err(e) = wait("ucp_get_nbx", Some(req), workers) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Waits until every operation issued on this endpoint completed at the peer.
    pub fn flush(&self, workers: &[&Worker]) -> Result<()> {
        let param = Self::param();
        // SAFETY: valid endpoint.
        let p = unsafe { sys::ucp_ep_flush_nbx(self.raw, &param) };
        wait("ucp_ep_flush_nbx", status_ptr("ucp_ep_flush_nbx", p)?, workers)
    }

    /// Closes the endpoint (flushing), progressing `workers`.
    pub fn close(self, workers: &[&Worker]) -> Result<()> {
        let param = Self::param();
        // SAFETY: the endpoint is not used again (consumed).
        let p = unsafe { sys::ucp_ep_close_nbx(self.raw, &param) };
        std::mem::forget(self);
        wait("ucp_ep_close_nbx", status_ptr("ucp_ep_close_nbx", p)?, workers)
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        // Forced close without waiting (the worker may be gone soon): best effort.
        let mut param = Self::param();
        param.op_attr_mask = sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_FLAGS;
        param.flags = sys::ucp_ep_close_flags_t_UCP_EP_CLOSE_FLAG_FORCE;
        // SAFETY: valid endpoint; the request, if any, is freed by UCX when it completes.
        let p = unsafe { sys::ucp_ep_close_nbx(self.raw, &param) };
        if let Ok(Some(req)) = status_ptr("ucp_ep_close_nbx", p) {
            // SAFETY: releases our reference; UCX completes it on a later progress.
            unsafe { sys::ucp_request_free(req) };
        }
    }
}
