//! One io_uring per spill file, driven by its own thread.
//!
//! The pool's segments are registered as fixed buffers and the spill file as a fixed file, so a
//! block moves between a pool slot and the file with one `READ_FIXED`/`WRITE_FIXED` and no bounce
//! buffer or per-I/O page pinning. Callers hand operations over a channel and await a oneshot;
//! the thread keeps up to `depth` of them in flight.

use crate::supervise::Part;
use io_uring::{opcode, types, IoUring};
use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::oneshot;

/// Direction of one transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// File to memory.
    Read,
    /// Memory to file.
    Write,
}

/// One transfer between registered memory and the ring's file.
#[derive(Clone, Copy, Debug)]
pub struct IoOp {
    /// Direction.
    pub dir: Dir,
    /// Index of the registered buffer `addr` lies in.
    pub buf_index: u16,
    /// Start address in memory (inside buffer `buf_index`).
    pub addr: usize,
    /// Bytes to move (a multiple of the device's logical block size).
    pub len: u32,
    /// Byte offset in the file (aligned like `len`).
    pub offset: u64,
}

struct Pending {
    op: IoOp,
    /// Taken when answered.
    done: Option<oneshot::Sender<io::Result<()>>>,
    /// The ring's count of transfers queued or in flight: this one leaves it just before it is
    /// answered (so the submitter never sees itself counted), or when dropped unanswered.
    queued: Arc<AtomicU64>,
}

impl Pending {
    /// Answers the submitter (who may have stopped waiting).
    fn answer(mut self, outcome: io::Result<()>) {
        if let Some(done) = self.leave() {
            let _ = done.send(outcome);
        }
    }

    /// Leaves the count (once); the answer channel, if not taken yet.
    fn leave(&mut self) -> Option<oneshot::Sender<io::Result<()>>> {
        let done = self.done.take();
        if done.is_some() {
            self.queued.fetch_sub(1, Ordering::Release);
        }
        done
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Handle to a ring thread. Dropping it lets the thread finish its in-flight work and exit.
pub struct Ring {
    tx: mpsc::Sender<Pending>,
    thread: Option<std::thread::JoinHandle<Option<()>>>,
    queued: Arc<AtomicU64>,
}

/// A registered memory region: (start address, length).
pub type Region = (usize, usize);

impl Ring {
    /// Starts a ring of `depth` entries on `fd` with `buffers` registered as fixed buffers.
    /// Every buffer must stay mapped for as long as the ring lives, and be at most 1 GiB.
    /// The ring's thread runs as `part` (a stall: transfers in flight and none completing).
    pub fn start(fd: RawFd, buffers: &[Region], depth: u32, part: Arc<Part>) -> io::Result<Ring> {
        let ring = IoUring::new(depth.max(1))?;
        let iovecs: Vec<libc::iovec> =
            buffers.iter().map(|&(addr, len)| libc::iovec { iov_base: addr as *mut _, iov_len: len }).collect();
        // SAFETY: the caller guarantees the regions stay mapped for the ring's life.
        unsafe { ring.submitter().register_buffers(&iovecs)? };
        ring.submitter().register_files(&[fd])?;
        let (tx, rx) = mpsc::channel();
        let thread = crate::supervise::thread(part, move |part| drive(ring, rx, depth.max(1) as usize, part))?;
        Ok(Ring { tx, thread: Some(thread), queued: Arc::new(AtomicU64::new(0)) })
    }

    /// Queues one transfer now; the returned future resolves when it completed (a short
    /// transfer is an error). Queue many, then await them, to keep the device busy.
    pub fn submit(&self, op: IoOp) -> impl std::future::Future<Output = io::Result<()>> + Send + 'static {
        let (done, rx) = oneshot::channel();
        self.queued.fetch_add(1, Ordering::Relaxed);
        let sent = self.tx.send(Pending { op, done: Some(done), queued: Arc::clone(&self.queued) }).is_ok();
        async move {
            let stopped = || io::Error::other("disk ring stopped");
            if !sent {
                return Err(stopped());
            }
            rx.await.map_err(|_| stopped())?
        }
    }
}

impl Ring {
    /// Transfers submitted and not yet answered: waiting for a ring entry or in the kernel.
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Acquire)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let (dead, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.tx, dead));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sqe_of(op: &IoOp, user_data: u64) -> io_uring::squeue::Entry {
    let file = types::Fixed(0);
    match op.dir {
        Dir::Read => opcode::ReadFixed::new(file, op.addr as *mut u8, op.len, op.buf_index).offset(op.offset).build(),
        Dir::Write => {
            opcode::WriteFixed::new(file, op.addr as *const u8, op.len, op.buf_index).offset(op.offset).build()
        }
    }
    .user_data(user_data)
}

fn drive(mut ring: IoUring, rx: mpsc::Receiver<Pending>, depth: usize, part: &Part) {
    let mut inflight: HashMap<u64, Pending> = HashMap::with_capacity(depth);
    let mut next_id = 0u64;
    let mut open = true;
    loop {
        // Fill the queue: block only when nothing is in flight.
        while open && inflight.len() < depth {
            let p = if inflight.is_empty() {
                part.waiting(true);
                let got = rx.recv();
                part.waiting(false);
                match got {
                    Ok(p) => p,
                    Err(_) => {
                        open = false;
                        break;
                    }
                }
            } else {
                match rx.try_recv() {
                    Ok(p) => p,
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            };
            crate::fault::point(&part.name);
            next_id += 1;
            // SAFETY: the buffer stays valid until its completion is reaped (callers await it;
            // the memory is the pool, registered for the ring's life).
            let pushed = unsafe { ring.submission().push(&sqe_of(&p.op, next_id)) };
            if pushed.is_err() {
                p.answer(Err(io::Error::other("submission queue full")));
                continue;
            }
            inflight.insert(next_id, p);
        }
        if inflight.is_empty() {
            if open {
                continue;
            }
            return;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            for (_, p) in inflight.drain() {
                p.answer(Err(io::Error::new(e.kind(), format!("io_uring submit: {e}"))));
            }
            continue;
        }
        for cqe in ring.completion() {
            part.beat();
            let Some(p) = inflight.remove(&cqe.user_data()) else { continue };
            let res = cqe.result();
            let outcome = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else if res as u32 != p.op.len {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short transfer: {res} of {} bytes", p.op.len),
                ))
            } else {
                Ok(())
            };
            p.answer(outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[tokio::test]
    async fn queued_counts_transfers_until_they_are_answered() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        let mut buf = vec![7u8; 1 << 20];
        let base = buf.as_mut_ptr() as usize;
        let part = crate::supervise::Parts::default().add("ring-test", crate::supervise::Role::Disk, None);
        let ring = Ring::start(file.as_raw_fd(), &[(base, buf.len())], 4, part).unwrap();
        let op = |i: usize| IoOp {
            dir: Dir::Write,
            buf_index: 0,
            addr: base + i * 4096,
            len: 4096,
            offset: (i * 4096) as u64,
        };
        let writes: Vec<_> = (0..64).map(|i| ring.submit(op(i))).collect();
        assert!(ring.queued() <= 64);
        for w in writes {
            w.await.unwrap();
        }
        assert_eq!(ring.queued(), 0);
        // A submitter that stops waiting: its transfer still leaves the count when done.
        drop((0..8).map(|i| ring.submit(op(i))).collect::<Vec<_>>());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ring.queued() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(ring.queued(), 0);
        drop(ring);
        drop(buf);
    }
}
