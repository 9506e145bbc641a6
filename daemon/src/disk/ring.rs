//! One io_uring per spill file, driven by its own thread.
//!
//! The pool's segments are registered as fixed buffers and the spill file as a fixed file, so a
//! block moves between a pool slot and the file with one `READ_FIXED`/`WRITE_FIXED` and no bounce
//! buffer or per-I/O page pinning. Callers hand operations over a channel and await a oneshot;
//! the thread keeps up to `depth` of them in flight.

use io_uring::{opcode, types, IoUring};
use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::mpsc;
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
    done: oneshot::Sender<io::Result<()>>,
}

/// Handle to a ring thread. Dropping it lets the thread finish its in-flight work and exit.
pub struct Ring {
    tx: mpsc::Sender<Pending>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A registered memory region: (start address, length).
pub type Region = (usize, usize);

impl Ring {
    /// Starts a ring of `depth` entries on `fd` with `buffers` registered as fixed buffers.
    /// Every buffer must stay mapped for as long as the ring lives, and be at most 1 GiB.
    pub fn start(fd: RawFd, buffers: &[Region], depth: u32, name: &str) -> io::Result<Ring> {
        let ring = IoUring::new(depth.max(1))?;
        let iovecs: Vec<libc::iovec> =
            buffers.iter().map(|&(addr, len)| libc::iovec { iov_base: addr as *mut _, iov_len: len }).collect();
        // SAFETY: the caller guarantees the regions stay mapped for the ring's life.
        unsafe { ring.submitter().register_buffers(&iovecs)? };
        ring.submitter().register_files(&[fd])?;
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("kvtier-ring-{name}"))
            .spawn(move || drive(ring, rx, depth.max(1) as usize))?;
        Ok(Ring { tx, thread: Some(thread) })
    }

    /// Queues one transfer now; the returned future resolves when it completed (a short
    /// transfer is an error). Queue many, then await them, to keep the device busy.
    pub fn submit(&self, op: IoOp) -> impl std::future::Future<Output = io::Result<()>> + Send + 'static {
        let (done, rx) = oneshot::channel();
        let sent = self.tx.send(Pending { op, done }).is_ok();
        async move {
            let stopped = || io::Error::other("disk ring stopped");
            if !sent {
                return Err(stopped());
            }
            rx.await.map_err(|_| stopped())?
        }
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

fn drive(mut ring: IoUring, rx: mpsc::Receiver<Pending>, depth: usize) {
    let mut inflight: HashMap<u64, Pending> = HashMap::with_capacity(depth);
    let mut next_id = 0u64;
    let mut open = true;
    loop {
        // Fill the queue: block only when nothing is in flight.
        while open && inflight.len() < depth {
            let p = if inflight.is_empty() {
                match rx.recv() {
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
            next_id += 1;
            // SAFETY: the buffer stays valid until its completion is reaped (callers await it;
            // the memory is the pool, registered for the ring's life).
            let pushed = unsafe { ring.submission().push(&sqe_of(&p.op, next_id)) };
            if pushed.is_err() {
                let _ = p.done.send(Err(io::Error::other("submission queue full")));
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
                let _ = p.done.send(Err(io::Error::new(e.kind(), format!("io_uring submit: {e}"))));
            }
            continue;
        }
        for cqe in ring.completion() {
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
            let _ = p.done.send(outcome);
        }
    }
}
