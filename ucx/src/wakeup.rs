//! Sleeping until a worker has work: UCX's wakeup feature (`ucp_worker_arm` and the worker's
//! event fd), so that a thread with nothing to do but wait for its peer leaves the CPU to whoever
//! will make something happen, instead of spinning or napping blind.

use crate::{check, sys, Result, Worker};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::os::fd::{BorrowedFd, RawFd};
use std::time::Duration;

/// How a [`Worker::wait`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// The worker had events pending already: progress it (nothing was waited for).
    Busy,
    /// The worker's event fd or `also` became readable.
    Ready,
    /// The timeout passed.
    TimedOut,
}

impl Worker {
    /// The worker's event fd (readable when it has events, once armed).
    fn event_fd(&self) -> Result<RawFd> {
        let mut fd = -1;
        // SAFETY: valid worker and out-pointer.
        check("ucp_worker_get_efd", unsafe { sys::ucp_worker_get_efd(self.raw, &mut fd) })?;
        Ok(fd)
    }

    /// Arms the worker's event fd and sleeps until it signals (a message, a completion, a
    /// connection event), `also` becomes readable (e.g. an eventfd that other threads write to
    /// hand this one work), or `timeout` passes. Returns [`Woken::Busy`] at once when the worker
    /// still has events to progress. Call it only after progress found nothing to do.
    pub fn wait(&self, also: Option<BorrowedFd<'_>>, timeout: Duration) -> Result<Woken> {
        let fd = self.event_fd()?;
        // SAFETY: valid worker.
        let status = unsafe { sys::ucp_worker_arm(self.raw) };
        if status == sys::ucs_status_t_UCS_ERR_BUSY {
            return Ok(Woken::Busy);
        }
        check("ucp_worker_arm", status)?;
        // SAFETY: the worker owns `fd` and outlives this call.
        let worker_fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let mut fds = vec![PollFd::new(worker_fd, PollFlags::POLLIN)];
        fds.extend(also.map(|fd| PollFd::new(fd, PollFlags::POLLIN)));
        let ms =
            PollTimeout::try_from(timeout.as_millis().max(1).min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, ms) {
            Ok(0) => Ok(Woken::TimedOut),
            // Interrupted by a signal: the caller progresses and comes back.
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(Woken::Ready),
            Err(e) => Err(crate::UcxError {
                call: "poll",
                status: sys::ucs_status_t_UCS_ERR_IO_ERROR,
                message: e.to_string(),
            }),
        }
    }
}
