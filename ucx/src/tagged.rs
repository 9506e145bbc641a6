//! Tagged messages that complete in the background: many sends and receives in flight at once,
//! each named by a caller token; completions are queued by UCX callbacks during
//! [`Worker::progress`] and taken with [`Worker::take_completions`].
//!
//! A receive writes into its buffer only while it is pending: cancelled before a sender matched
//! it, it completes as cancelled and its buffer is the caller's again. This is why kvtier ships
//! blocks as tagged messages rather than remote writes into the receiver's memory.

use crate::{check, status_ptr, sys, Endpoint, Region, Result, UcxError, Worker};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

/// One finished send or receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The token the operation was posted with.
    pub token: u64,
    /// Success, or UCX's error (a cancelled receive: "Request canceled").
    pub result: Result<()>,
    /// Bytes received (for receives; the posted length for sends).
    pub length: usize,
}

/// Requests in flight and completions not yet taken, shared with UCX's callbacks.
#[derive(Default)]
pub(crate) struct Ops {
    pub(crate) pending: HashMap<u64, *mut c_void>,
    done: Vec<(Completion, *mut c_void)>,
    /// Endpoints UCX reported failed (by [`Endpoint::id`](crate::Endpoint::id)), not yet taken.
    pub(crate) failed: Vec<usize>,
}

/// What a callback gets as `user_data`: where to queue, the token, and the posted length.
struct Slot {
    ops: *const RefCell<Ops>,
    token: u64,
    length: usize,
}

fn finished(slot: *mut c_void, request: *mut c_void, status: sys::ucs_status_t, length: Option<usize>) {
    // SAFETY: `slot` is the Box leaked at post time, taken back exactly once here; the Ops
    // outlive every request (the worker drains them before it is destroyed).
    let slot = unsafe { Box::from_raw(slot.cast::<Slot>()) };
    let ops = unsafe { &*slot.ops };
    let mut ops = ops.borrow_mut();
    let length = length.unwrap_or(slot.length);
    ops.done.push((Completion { token: slot.token, result: check("completion", status), length }, request));
}

unsafe extern "C" fn send_done(request: *mut c_void, status: sys::ucs_status_t, user_data: *mut c_void) {
    finished(user_data, request, status, None);
}

unsafe extern "C" fn recv_done(
    request: *mut c_void,
    status: sys::ucs_status_t,
    info: *const sys::ucp_tag_recv_info_t,
    user_data: *mut c_void,
) {
    // SAFETY: UCX passes valid info for a completed receive (null is tolerated).
    let length = unsafe { info.as_ref() }.map_or(0, |i| i.length);
    finished(user_data, request, status, Some(length));
}

impl Worker {
    /// The parameter block of operation `token` on `length` bytes (refused while that token is
    /// still in flight), and the callback's slot it points to.
    fn param(
        &self,
        call: &'static str,
        token: u64,
        length: usize,
        region: Option<&Region>,
    ) -> Result<(sys::ucp_request_param_t, *mut Slot)> {
        if self.ops.borrow().pending.contains_key(&token) {
            return Err(UcxError { call, status: -1, message: format!("token {token} is still in flight") });
        }
        let slot = Box::into_raw(Box::new(Slot { ops: &*self.ops, token, length }));
        // SAFETY: all-zero is a valid parameter block; the fields set are named in the mask.
        let mut param: sys::ucp_request_param_t = unsafe { std::mem::zeroed() };
        param.op_attr_mask =
            sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_CALLBACK | sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_USER_DATA;
        param.user_data = slot.cast();
        if let Some(r) = region {
            // Registered already: UCX skips its registration cache (zero copy on RDMA).
            param.op_attr_mask |= sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_MEMH;
            param.memh = r.memh;
        }
        Ok((param, slot))
    }

    /// Files what an `_nbx` call returned: in flight (kept for cancel), done at once (queued
    /// here with `length`), or refused (the error).
    fn posted(
        &self,
        call: &'static str,
        token: u64,
        slot: *mut Slot,
        p: sys::ucs_status_ptr_t,
        length: usize,
    ) -> Result<()> {
        let status = status_ptr(call, p);
        let mut ops = self.ops.borrow_mut();
        match status {
            Ok(Some(req)) => {
                ops.pending.insert(token, req);
                Ok(())
            }
            Ok(None) => {
                // SAFETY: no callback will run for an operation that completed in place.
                drop(unsafe { Box::from_raw(slot) });
                ops.done.push((Completion { token, result: Ok(()), length }, std::ptr::null_mut()));
                Ok(())
            }
            Err(e) => {
                // SAFETY: as above: a refused operation has no callback.
                drop(unsafe { Box::from_raw(slot) });
                Err(e)
            }
        }
    }

    /// Posts a receive of the message tagged `tag` into `len` bytes at `buf` (inside `region`
    /// when given); it completes (see [`take_completions`](Self::take_completions)) as `token`.
    ///
    /// # Safety
    /// The buffer must stay valid and untouched by anyone else until this token's completion
    /// was taken, and lie inside `region` when one is given.
    pub unsafe fn tag_recv(
        &self,
        buf: *mut u8,
        len: usize,
        region: Option<&Region>,
        tag: u64,
        token: u64,
    ) -> Result<()> {
        let call = "ucp_tag_recv_nbx";
        let (mut param, slot) = self.param(call, token, len, region)?;
        param.cb.recv = Some(recv_done);
        // Where UCX reports the length of a message received in place (no callback then).
        let mut info = sys::ucp_tag_recv_info_t { sender_tag: 0, length: 0 };
        param.op_attr_mask |= sys::ucp_op_attr_t_UCP_OP_ATTR_FIELD_RECV_INFO;
        param.recv_info.tag_info = &mut info;
        let p = sys::ucp_tag_recv_nbx(self.raw, buf.cast(), len, tag, u64::MAX, &param);
        self.posted(call, token, slot, p, info.length)
    }

    /// Sends `len` bytes at `buf` (inside `region` when given) over `ep` (an endpoint of this
    /// worker) tagged `tag`; it completes as `token`.
    ///
    /// # Safety
    /// The buffer must stay valid and unchanged until this token's completion was taken, and
    /// lie inside `region` when one is given.
    pub unsafe fn tag_send(
        &self,
        ep: &Endpoint,
        buf: *const u8,
        len: usize,
        region: Option<&Region>,
        tag: u64,
        token: u64,
    ) -> Result<()> {
        let call = "ucp_tag_send_nbx";
        let (mut param, slot) = self.param(call, token, len, region)?;
        param.cb.send = Some(send_done);
        let p = sys::ucp_tag_send_nbx(ep.raw, buf.cast(), len, tag, &param);
        self.posted(call, token, slot, p, len)
    }

    /// Flushes `ep` (an endpoint of this worker) in the background; it completes as `token` once
    /// every operation issued on it before completed at the peer. On an endpoint just created
    /// that is also once its connection is set up: UCX picks a message's protocol when it is
    /// posted, and messages posted before then go eager (copied through bounce buffers on the
    /// receiver) rather than rendezvous, whatever their size.
    pub fn flush_endpoint(&self, ep: &Endpoint, token: u64) -> Result<()> {
        let call = "ucp_ep_flush_nbx";
        let (mut param, slot) = self.param(call, token, 0, None)?;
        param.cb.send = Some(send_done);
        // SAFETY: valid endpoint of this worker; the slot is reclaimed by the callback or below.
        let p = unsafe { sys::ucp_ep_flush_nbx(ep.raw, &param) };
        self.posted(call, token, slot, p, 0)
    }

    /// Asks UCX to cancel operation `token` if it is still in flight: a receive no sender has
    /// matched completes as cancelled on a later progress; one being filled completes normally.
    pub fn cancel(&self, token: u64) {
        let req = self.ops.borrow().pending.get(&token).copied();
        if let Some(req) = req {
            // SAFETY: a request still in flight (not yet freed: that happens when taken).
            unsafe { sys::ucp_request_cancel(self.raw, req) };
        }
    }

    /// Operations in flight.
    pub fn in_flight(&self) -> usize {
        self.ops.borrow().pending.len()
    }

    /// Takes the completions queued so far (progress the worker to get more).
    pub fn take_completions(&self) -> Vec<Completion> {
        let done = std::mem::take(&mut self.ops.borrow_mut().done);
        let mut ops = self.ops.borrow_mut();
        done.into_iter()
            .map(|(c, req)| {
                ops.pending.remove(&c.token);
                if !req.is_null() {
                    // SAFETY: completed (its callback ran) and not freed before.
                    unsafe { sys::ucp_request_free(req) };
                }
                c
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_status_maps_to_results() {
        assert!(check("completion", sys::ucs_status_t_UCS_OK).is_ok());
        let e = check("completion", sys::ucs_status_t_UCS_ERR_CANCELED).unwrap_err();
        assert_eq!(e.message, "Request canceled");
    }
}
