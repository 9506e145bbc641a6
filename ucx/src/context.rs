//! UCP context (features, transports) and workers (progress engine, address).

use crate::tagged::Ops;
use crate::{check, sys, Endpoint, Result};
use std::cell::RefCell;
use std::ffi::CString;
use std::ptr;
use std::sync::Arc;

/// A UCP context with RMA, active messages, tagged messages and wakeup (event fd) enabled.
pub struct Context {
    pub(crate) raw: sys::ucp_context_h,
}

// SAFETY: a UCP context may be used from any thread (workers are the per-thread objects).
unsafe impl Send for Context {}
unsafe impl Sync for Context {}

impl Context {
    /// A context reading `UCX_*` from the environment, then applying `settings` (name without
    /// the `UCX_` prefix, value), e.g. `[("TLS", "tcp")]`.
    pub fn new(settings: &[(&str, &str)]) -> Result<Arc<Self>> {
        let mut config: *mut sys::ucp_config_t = ptr::null_mut();
        // SAFETY: plain C calls with valid out-pointers; the config is released below.
        unsafe {
            check("ucp_config_read", sys::ucp_config_read(ptr::null(), ptr::null(), &mut config))?;
            for (name, value) in settings {
                let (n, v) = (CString::new(*name).expect("no NUL"), CString::new(*value).expect("no NUL"));
                let status = sys::ucp_config_modify(config, n.as_ptr(), v.as_ptr());
                if let Err(e) = check("ucp_config_modify", status) {
                    sys::ucp_config_release(config);
                    return Err(e);
                }
            }
            let mut params: sys::ucp_params_t = std::mem::zeroed();
            params.field_mask = sys::ucp_params_field_UCP_PARAM_FIELD_FEATURES as u64;
            params.features = (sys::ucp_feature_UCP_FEATURE_RMA
                | sys::ucp_feature_UCP_FEATURE_AM
                | sys::ucp_feature_UCP_FEATURE_TAG
                | sys::ucp_feature_UCP_FEATURE_WAKEUP) as u64;
            let mut raw: sys::ucp_context_h = ptr::null_mut();
            let status = sys::ucp_init_version(sys::UCP_API_MAJOR, sys::UCP_API_MINOR, &params, config, &mut raw);
            sys::ucp_config_release(config);
            check("ucp_init", status)?;
            Ok(Arc::new(Self { raw }))
        }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: workers and regions hold an Arc, so nothing uses the context any more.
        unsafe { sys::ucp_cleanup(self.raw) }
    }
}

/// A UCP worker: the progress engine endpoints and requests belong to.
pub struct Worker {
    pub(crate) raw: sys::ucp_worker_h,
    pub(crate) ctx: Arc<Context>,
    /// Tagged operations in flight and their completions (boxed: callbacks point at it).
    pub(crate) ops: Box<RefCell<Ops>>,
}

// SAFETY: single-thread mode means one thread at a time, which `!Sync` and `&mut`-free use give.
unsafe impl Send for Worker {}

impl Worker {
    /// A single-threaded worker of `ctx`.
    pub fn new(ctx: &Arc<Context>) -> Result<Self> {
        // SAFETY: valid context and out-pointer.
        unsafe {
            let mut params: sys::ucp_worker_params_t = std::mem::zeroed();
            params.field_mask = sys::ucp_worker_params_field_UCP_WORKER_PARAM_FIELD_THREAD_MODE as u64;
            params.thread_mode = sys::ucs_thread_mode_t_UCS_THREAD_MODE_SINGLE;
            let mut raw: sys::ucp_worker_h = ptr::null_mut();
            check("ucp_worker_create", sys::ucp_worker_create(ctx.raw, &params, &mut raw))?;
            Ok(Self { raw, ctx: Arc::clone(ctx), ops: Box::default() })
        }
    }

    /// The worker's address, to hand to a peer (over any control channel).
    pub fn address(&self) -> Result<Vec<u8>> {
        // SAFETY: the address is copied out and released.
        unsafe {
            let mut addr: *mut sys::ucp_address_t = ptr::null_mut();
            let mut len = 0usize;
            check("ucp_worker_get_address", sys::ucp_worker_get_address(self.raw, &mut addr, &mut len))?;
            let out = std::slice::from_raw_parts(addr as *const u8, len).to_vec();
            sys::ucp_worker_release_address(self.raw, addr);
            Ok(out)
        }
    }

    /// Makes progress on pending communication; returns how many events were handled.
    pub fn progress(&self) -> u32 {
        // SAFETY: valid worker.
        unsafe { sys::ucp_worker_progress(self.raw) }
    }

    /// Connects to the worker whose [`address`](Self::address) is `remote`. With
    /// `detect_peer_failure`, a dead peer fails pending operations instead of hanging them; UCX
    /// 1.13's shared-memory transports cannot do that and are then "unreachable".
    pub fn connect(&self, remote: &[u8], detect_peer_failure: bool) -> Result<Endpoint> {
        Endpoint::connect(self, remote, detect_peer_failure)
    }

    /// Endpoints of this worker (made with peer-failure detection) that UCX reported failed
    /// since the last call, by [`Endpoint::id`]: close them (drop) and stop using them.
    pub fn take_failed_endpoints(&self) -> Vec<usize> {
        std::mem::take(&mut self.ops.borrow_mut().failed)
    }

    /// The context this worker belongs to.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }
}

/// Smallest and largest worker address accepted from a peer (UCX 1.13's are ~50 to ~250 bytes).
const ADDRESS_BYTES: std::ops::RangeInclusive<usize> = 16..=16 << 10;

/// Checks what can be checked of a worker address received from elsewhere before it is
/// connected to: its size, and that UCX reads its header (`ucp_worker_address_query`). UCX cannot
/// validate the rest: an address must still come from a peer trusted to send its own.
pub fn check_worker_address(address: &[u8]) -> Result<u64> {
    let bad = |message: String| crate::UcxError { call: "worker address", status: -1, message };
    if !ADDRESS_BYTES.contains(&address.len()) {
        return Err(bad(format!("worker address of {} bytes; UCX's are {ADDRESS_BYTES:?}", address.len())));
    }
    // SAFETY: UCX reads the header of the buffer (at least 16 bytes, checked above).
    unsafe {
        let mut attr: sys::ucp_worker_address_attr_t = std::mem::zeroed();
        attr.field_mask = sys::ucp_worker_address_attr_field_UCP_WORKER_ADDRESS_ATTR_FIELD_UID as u64;
        check("ucp_worker_address_query", sys::ucp_worker_address_query(address.as_ptr() as *mut _, &mut attr))?;
        Ok(attr.worker_uid)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // SAFETY: endpoints must be closed first (they borrow the worker).
        unsafe { sys::ucp_worker_destroy(self.raw) }
        if !self.ops.borrow().pending.is_empty() {
            // Requests UCX never completed may still point at the queue: keep it alive.
            std::mem::forget(std::mem::take(&mut self.ops));
        }
    }
}
