//! Listeners and client-server endpoints: a peer that knows only an IP address and a port
//! connects through UCX's TCP connection manager, and neither side parses a worker address
//! taken from the other. UCX 1.13 has no connection manager over shared memory: with `UCX_TLS`
//! naming only shared-memory transports, connecting this way fails (worker addresses still work).

use crate::{check, sys, Endpoint, Result, UcxError, Worker};
use nix::sys::socket::{SockaddrLike, SockaddrStorage};
use std::cell::RefCell;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::ptr;

/// A connection a peer asked for, to accept ([`Worker::accept`]) or reject
/// ([`Listener::reject`]); one dropped unanswered is rejected. It borrows its listener, which
/// must still exist to answer it.
pub struct ConnRequest<'l> {
    raw: sys::ucp_conn_request_h,
    listener: sys::ucp_listener_h,
    of: PhantomData<&'l ()>,
}

impl Drop for ConnRequest<'_> {
    fn drop(&mut self) {
        if !self.raw.is_null() {
            // SAFETY: an unanswered request of a live listener (the borrow; and the listener
            // rejects what is still queued before it is destroyed).
            unsafe { sys::ucp_listener_reject(self.listener, self.raw) };
        }
    }
}

/// Accepts connections on a socket address for one worker; requests arrive while the worker
/// progresses and are taken with [`take_requests`](Self::take_requests).
pub struct Listener<'w> {
    raw: sys::ucp_listener_h,
    /// Requests UCX handed over, not yet taken (boxed: the callback points at it).
    arrived: Box<RefCell<Vec<sys::ucp_conn_request_h>>>,
    worker: PhantomData<&'w Worker>,
}

unsafe extern "C" fn conn_arrived(request: sys::ucp_conn_request_h, arg: *mut c_void) {
    // SAFETY: `arg` is the listener's queue, which outlives the listener's callbacks.
    let arrived = unsafe { &*arg.cast::<RefCell<Vec<sys::ucp_conn_request_h>>>() };
    arrived.borrow_mut().push(request);
}

fn sock_addr(at: &SockaddrStorage) -> sys::ucs_sock_addr_t {
    sys::ucs_sock_addr_t { addr: at.as_ptr().cast(), addrlen: at.len() }
}

impl Worker {
    /// Listens on `at` (port 0: any free port, see [`Listener::local_addr`]).
    pub fn listen(&self, at: SocketAddr) -> Result<Listener<'_>> {
        let at = SockaddrStorage::from(at);
        let arrived: Box<RefCell<Vec<sys::ucp_conn_request_h>>> = Box::default();
        // SAFETY: all-zero is a valid parameter block; the fields set are named in the mask.
        let mut params: sys::ucp_listener_params_t = unsafe { std::mem::zeroed() };
        params.field_mask = (sys::ucp_listener_params_field_UCP_LISTENER_PARAM_FIELD_SOCK_ADDR
            | sys::ucp_listener_params_field_UCP_LISTENER_PARAM_FIELD_CONN_HANDLER) as u64;
        params.sockaddr = sock_addr(&at);
        params.conn_handler = sys::ucp_listener_conn_handler_t {
            cb: Some(conn_arrived),
            arg: (&*arrived as *const RefCell<_>).cast_mut().cast(),
        };
        let mut raw: sys::ucp_listener_h = ptr::null_mut();
        // SAFETY: valid worker; the address outlives the call; the queue outlives the listener.
        check("ucp_listener_create", unsafe { sys::ucp_listener_create(self.raw, &params, &mut raw) })?;
        Ok(Listener { raw, arrived, worker: PhantomData })
    }

    /// Accepts `request` (from one of this worker's listeners) as an endpoint to its peer.
    pub fn accept(&self, mut request: ConnRequest<'_>, detect_peer_failure: bool) -> Result<Endpoint> {
        let mut params = Endpoint::params(self, detect_peer_failure);
        params.field_mask |= sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_CONN_REQUEST as u64;
        // Answered either way: UCX consumes the request even when creating the endpoint fails.
        params.conn_request = std::mem::replace(&mut request.raw, ptr::null_mut());
        // SAFETY: a request of this worker's listener, answered once.
        unsafe { Endpoint::create(self, &params) }
    }

    /// Connects to the worker listening on `at`. The connection completes while both workers
    /// progress; operations posted meanwhile wait for it.
    pub fn connect_to(&self, at: SocketAddr, detect_peer_failure: bool) -> Result<Endpoint> {
        let at = SockaddrStorage::from(at);
        let mut params = Endpoint::params(self, detect_peer_failure);
        params.field_mask |= (sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_FLAGS
            | sys::ucp_ep_params_field_UCP_EP_PARAM_FIELD_SOCK_ADDR) as u64;
        params.flags = sys::ucp_ep_params_flags_field_UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
        params.sockaddr = sock_addr(&at);
        // SAFETY: the socket address outlives the call.
        unsafe { Endpoint::create(self, &params) }
    }
}

impl Listener<'_> {
    /// The address it listens on (with the port the system picked for port 0).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        // SAFETY: all-zero is a valid attribute block; UCX fills the field asked for.
        let mut attr: sys::ucp_listener_attr_t = unsafe { std::mem::zeroed() };
        attr.field_mask = sys::ucp_listener_attr_field_UCP_LISTENER_ATTR_FIELD_SOCKADDR as u64;
        check("ucp_listener_query", unsafe { sys::ucp_listener_query(self.raw, &mut attr) })?;
        // SAFETY: UCX wrote a socket address of its family into the storage.
        let storage = unsafe {
            SockaddrStorage::from_raw(ptr::addr_of!(attr.sockaddr).cast(), Some(size_of_val(&attr.sockaddr) as u32))
        };
        let bad = || UcxError { call: "ucp_listener_query", status: -1, message: "not an IP address".into() };
        let storage = storage.ok_or_else(bad)?;
        if let Some(v4) = storage.as_sockaddr_in() {
            return Ok(SocketAddr::V4((*v4).into()));
        }
        storage.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into())).ok_or_else(bad)
    }

    /// Connection requests that arrived since the last call (while the worker progressed).
    pub fn take_requests(&self) -> Vec<ConnRequest<'_>> {
        let raw = self.raw;
        self.arrived.borrow_mut().drain(..).map(|r| ConnRequest { raw: r, listener: raw, of: PhantomData }).collect()
    }

    /// Turns `request` down: its peer's endpoint fails.
    pub fn reject(&self, request: ConnRequest<'_>) {
        drop(request);
    }
}

impl Drop for Listener<'_> {
    fn drop(&mut self) {
        drop(self.take_requests());
        // SAFETY: valid listener, destroyed once; its worker outlives it (the borrow).
        unsafe { sys::ucp_listener_destroy(self.raw) };
    }
}
