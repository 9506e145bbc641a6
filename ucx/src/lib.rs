//! kvtier's own thin UCX bindings: bindgen over the system's `<ucp/api/ucp.h>` ([`sys`]) and a
//! small safe layer: [`Context`], [`Worker`] (address, progress), [`Endpoint`] (connect by worker
//! address, or by socket address to a [`Listener`]; put/get, flush; failures reported by
//! [`Worker::take_failed_endpoints`]), [`Region`] (registered memory and its packed remote key),
//! [`RemoteKey`], and tagged messages in flight by the thousand ([`Worker::tag_send`],
//! [`Worker::tag_recv`], [`Worker::take_completions`]), and sleeping until a worker has
//! something to do ([`Worker::wait`]).
//!
//! Threading: workers are created in single-thread mode; a worker, its endpoints and requests
//! are used from one thread at a time (they are `Send`, not `Sync`).
//!
//! Status: the foundation of the peer tier (issue 6); daemon-to-daemon shipping builds on it.

#![warn(missing_docs)]

/// Raw bindings generated at build time.
#[allow(non_camel_case_types, non_snake_case, non_upper_case_globals, dead_code, missing_docs, clippy::all)]
pub mod sys {
    include!(concat!(env!("OUT_DIR"), "/ucp.rs"));
}

mod context;
mod endpoint;
mod listener;
mod memory;
mod tagged;
mod wakeup;

pub use context::{check_worker_address, Context, Worker};
pub use endpoint::Endpoint;
pub use listener::{ConnRequest, Listener};
pub use memory::{Region, RemoteKey};
pub use tagged::Completion;
pub use wakeup::Woken;

/// A UCX call failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("{call}: {message} (UCX status {status})")]
pub struct UcxError {
    /// The UCX function.
    pub call: &'static str,
    /// Its status code (negative).
    pub status: i8,
    /// UCX's text for it.
    pub message: String,
}

/// Result of a UCX call.
pub type Result<T> = std::result::Result<T, UcxError>;

fn check(call: &'static str, status: sys::ucs_status_t) -> Result<()> {
    if status == sys::ucs_status_t_UCS_OK {
        return Ok(());
    }
    // SAFETY: returns a static string for any status.
    let text = unsafe { std::ffi::CStr::from_ptr(sys::ucs_status_string(status)) };
    Err(UcxError { call, status, message: text.to_string_lossy().into_owned() })
}

/// A status pointer (`ucs_status_ptr_t`): NULL (done), an error code, or a request to wait for.
/// These are the `UCS_PTR_IS_ERR` / `UCS_PTR_STATUS` macros of `ucs/type/status.h`.
fn status_ptr(call: &'static str, p: sys::ucs_status_ptr_t) -> Result<Option<sys::ucs_status_ptr_t>> {
    let v = p as usize;
    if v == 0 {
        return Ok(None);
    }
    if v >= sys::ucs_status_t_UCS_ERR_LAST as isize as usize {
        check(call, v as isize as sys::ucs_status_t)?;
    }
    Ok(Some(p))
}
