//! The `cma` backend: the daemon copies CPU engines' KV tensors itself with Linux cross-memory
//! attach (`process_vm_readv` / `process_vm_writev`), up to 1024 contiguous segments (every layer
//! of many blocks) per system call, one copy, no engine thread involved.
//!
//! The engine process is the one at the other end of the connector socket (SO_PEERCRED), never an
//! id from a message; it is held as a pidfd from registration on and checked alive before every
//! copy, so a recycled pid is never written. Reaching another process's memory takes the same
//! rights as ptrace: the engine's uid, or CAP_SYS_PTRACE across users and containers, and the
//! engine's pid visible in the daemon's PID namespace. Registration probes every tensor, so a
//! daemon without those rights says so then and the connector keeps copying itself.

use super::gather::Direction;
use super::layout::Segment;
use super::process::EngineProcess;
use super::{DeviceBackend, DeviceError, EngineMemory, EngineTensor};

/// Most iovecs one `process_vm_*` call takes (`IOV_MAX` on Linux).
const IOV_MAX: usize = 1024;

/// Daemon-side copies of host-memory engines.
pub struct CmaBackend;

impl DeviceBackend for CmaBackend {
    fn name(&self) -> &'static str {
        "cma"
    }

    fn offers_dma(&self) -> bool {
        true
    }

    fn import(&self, pid: Option<i32>, tensors: &[EngineTensor]) -> Result<Box<dyn EngineMemory>, DeviceError> {
        let pid = pid.filter(|&p| p > 0).ok_or_else(|| {
            DeviceError::Memory(
                "the engine's process is not visible to the daemon (another PID namespace: run the daemon \
                 in the host's PID namespace)"
                    .into(),
            )
        })?;
        let mut ranges = Vec::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            if t.address == 0 || t.bytes == 0 || t.address.checked_add(t.bytes).is_none() {
                return Err(DeviceError::Memory(format!(
                    "tensor {i}: address {:#x} and size {} do not name memory",
                    t.address, t.bytes
                )));
            }
            ranges.push((t.address, t.bytes));
        }
        let memory = CmaMemory { pid, engine: EngineProcess::open(pid)?, tensors: ranges };
        memory.probe()?;
        Ok(Box::new(memory))
    }
}

/// A registered engine's tensors: (address, bytes) in process `pid`.
struct CmaMemory {
    pid: i32,
    engine: EngineProcess,
    tensors: Vec<(u64, u64)>,
}

impl CmaMemory {
    /// Reads the first and the last byte of every tensor.
    fn probe(&self) -> Result<(), DeviceError> {
        let mut scratch = vec![0u8; 2 * self.tensors.len()];
        let base = scratch.as_mut_ptr() as u64;
        let plan: Vec<Segment> = (0..self.tensors.len() as u32)
            .flat_map(|t| {
                let last = self.tensors[t as usize].1 - 1;
                [(0, 0), (last, 1)].map(|(at, k)| Segment {
                    tensor: t,
                    engine_offset: at,
                    pool_offset: base + 2 * t as u64 + k,
                    bytes: 1,
                })
            })
            .collect();
        self.copy(&plan, Direction::ToPool)
    }

    /// Copies `plan` on this thread, up to IOV_MAX segments per system call.
    fn copy_serial(&self, plan: &[Segment], dir: Direction) -> Result<(), DeviceError> {
        // Both take (pid, local iovecs, remote iovecs, flags); the direction picks which way.
        let transfer = match dir {
            Direction::ToPool => libc::process_vm_readv,
            Direction::ToEngine => libc::process_vm_writev,
        };
        for batch in plan.chunks(IOV_MAX) {
            let (pool, engine) = iovecs(batch, &self.tensors)?;
            let want: usize = pool.iter().map(|v| v.iov_len).sum();
            // SAFETY: the pool iovecs are the daemon's own pool bytes the caller holds reserved or
            // pinned; the engine side is another process's memory, which the kernel checks.
            let done =
                unsafe { transfer(self.pid, pool.as_ptr(), pool.len() as _, engine.as_ptr(), engine.len() as _, 0) };
            if done < 0 {
                return Err(self.error(std::io::Error::last_os_error()));
            }
            if done as usize != want {
                return Err(self.error(std::io::Error::from_raw_os_error(libc::EFAULT)));
            }
        }
        Ok(())
    }

    fn error(&self, e: std::io::Error) -> DeviceError {
        let why = match e.raw_os_error() {
            Some(libc::EPERM) => format!(
                "not permitted to reach engine process {}'s memory (the daemon needs the engine's uid or \
                 CAP_SYS_PTRACE)",
                self.pid
            ),
            Some(libc::ESRCH) => format!("engine process {} has exited", self.pid),
            Some(libc::EFAULT) => format!("engine process {}: a registered tensor is no longer mapped", self.pid),
            _ => format!("copying engine process {}'s memory: {e}", self.pid),
        };
        DeviceError::Memory(why)
    }
}

/// The (pool, engine) iovec pairs of `plan` over tensors `(address, bytes)`, refusing any segment
/// outside its tensor.
fn iovecs(plan: &[Segment], tensors: &[(u64, u64)]) -> Result<(Vec<libc::iovec>, Vec<libc::iovec>), DeviceError> {
    let mut pool = Vec::with_capacity(plan.len());
    let mut engine = Vec::with_capacity(plan.len());
    for s in plan {
        let &(address, bytes) = tensors
            .get(s.tensor as usize)
            .ok_or_else(|| DeviceError::Memory(format!("copy names tensor {} of {}", s.tensor, tensors.len())))?;
        if s.engine_offset.checked_add(s.bytes).is_none_or(|end| end > bytes) {
            return Err(DeviceError::Memory(format!(
                "copy of {} bytes at {} lies outside tensor {} ({bytes} bytes)",
                s.bytes, s.engine_offset, s.tensor
            )));
        }
        let len = s.bytes as usize;
        pool.push(libc::iovec { iov_base: s.pool_offset as *mut libc::c_void, iov_len: len });
        engine.push(libc::iovec { iov_base: (address + s.engine_offset) as *mut libc::c_void, iov_len: len });
    }
    Ok((pool, engine))
}

/// Bytes below which a copy runs on one thread.
const PARALLEL_BYTES: u64 = 8 << 20;

/// `plan` cut into at most `parts` runs of about equal bytes (whole segments each).
fn split(plan: &[Segment], parts: usize) -> Vec<&[Segment]> {
    let total: u64 = plan.iter().map(|s| s.bytes).sum();
    let share = total.div_ceil(parts.max(1) as u64).max(1);
    let (mut out, mut start, mut acc) = (Vec::new(), 0, 0);
    for (i, s) in plan.iter().enumerate() {
        acc += s.bytes;
        if acc >= share {
            out.push(&plan[start..=i]);
            (start, acc) = (i + 1, 0);
        }
    }
    if start < plan.len() {
        out.push(&plan[start..]);
    }
    out
}

impl EngineMemory for CmaMemory {
    /// Large copies run on as many threads as there are CPUs (each system call copies with one).
    fn copy(&self, plan: &[Segment], dir: Direction) -> Result<(), DeviceError> {
        self.engine.alive()?;
        let bytes: u64 = plan.iter().map(|s| s.bytes).sum();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let parts = (bytes / PARALLEL_BYTES).clamp(1, cpus as u64) as usize;
        if parts == 1 {
            return self.copy_serial(plan, dir);
        }
        std::thread::scope(|scope| {
            let runs: Vec<_> =
                (split(plan, parts).into_iter()).map(|run| scope.spawn(move || self.copy_serial(run, dir))).collect();
            runs.into_iter().try_for_each(|r| r.join().expect("copy thread"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Option<i32> {
        Some(std::process::id() as i32)
    }

    fn tensor(bytes: &[u8]) -> EngineTensor {
        EngineTensor { address: bytes.as_ptr() as u64, bytes: bytes.len() as u64, ..Default::default() }
    }

    #[test]
    fn copies_thousands_of_segments_both_ways_in_own_memory() {
        let engine: Vec<Vec<u8>> = (0..3).map(|t| (0..65536u32).map(|i| (i * 7 + t) as u8).collect()).collect();
        let memory = CmaBackend.import(me(), &engine.iter().map(|e| tensor(e)).collect::<Vec<_>>()).unwrap();
        // 3000 segments of 16 bytes (three system calls), every one from a different place.
        let mut pool = vec![0u8; 3000 * 16];
        let plan: Vec<Segment> = (0..3000u64)
            .map(|k| Segment {
                tensor: (k % 3) as u32,
                engine_offset: (k * 21) % 65000,
                pool_offset: pool.as_mut_ptr() as u64 + k * 16,
                bytes: 16,
            })
            .collect();
        memory.copy(&plan, Direction::ToPool).unwrap();
        for (k, s) in plan.iter().enumerate() {
            let at = s.engine_offset as usize;
            assert_eq!(pool[k * 16..k * 16 + 16], engine[s.tensor as usize][at..at + 16], "segment {k}");
        }
        let mut back: Vec<Vec<u8>> = (0..3).map(|_| vec![0u8; 65536]).collect();
        let memory = CmaBackend.import(me(), &back.iter().map(|e| tensor(e)).collect::<Vec<_>>()).unwrap();
        memory.copy(&plan, Direction::ToEngine).unwrap();
        for s in &plan {
            let r = s.engine_offset as usize..(s.engine_offset + 16) as usize;
            assert_eq!(back[s.tensor as usize][r.clone()], engine[s.tensor as usize][r]);
        }
        back.clear();
    }

    #[test]
    fn large_copies_split_into_runs_of_about_equal_bytes_covering_the_plan() {
        let seg = |bytes| Segment { tensor: 0, engine_offset: 0, pool_offset: 0, bytes };
        let plan: Vec<Segment> = [4, 4, 4, 4, 1, 1, 1, 1, 8].map(seg).to_vec();
        let runs = split(&plan, 2);
        assert_eq!(runs.iter().map(|r| r.len()).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(runs.iter().map(|r| r.iter().map(|s| s.bytes).sum::<u64>()).collect::<Vec<_>>(), [16, 12]);
        assert_eq!(split(&plan, 1), [&plan[..]]);
        assert_eq!(split(&plan, 100).len(), plan.len(), "never more runs than segments");
        assert!(split(&[], 4).is_empty());
        // A copy big enough to run on several threads lands byte-exact.
        let engine: Vec<u8> = (0..(24u32 << 20)).map(|i| (i >> 3) as u8 ^ i as u8).collect();
        let memory = CmaBackend.import(me(), &[tensor(&engine)]).unwrap();
        let mut pool = vec![0u8; engine.len()];
        let base = pool.as_mut_ptr() as u64;
        let plan: Vec<Segment> = (0..(24u64 << 20) / 65536)
            .map(|k| Segment { tensor: 0, engine_offset: k * 65536, pool_offset: base + k * 65536, bytes: 65536 })
            .collect();
        memory.copy(&plan, Direction::ToPool).unwrap();
        assert!(pool == engine);
    }

    #[test]
    fn refuses_segments_outside_their_tensor_and_unknown_tensors() {
        let t = vec![0u8; 4096];
        let memory = CmaBackend.import(me(), &[tensor(&t)]).unwrap();
        let mut pool = [0u8; 64];
        let at = pool.as_mut_ptr() as u64;
        let seg = |tensor, engine_offset| Segment { tensor, engine_offset, pool_offset: at, bytes: 64 };
        let err = memory.copy(&[seg(0, 4090)], Direction::ToPool).unwrap_err();
        assert!(err.to_string().contains("outside tensor 0"), "{err}");
        let err = memory.copy(&[seg(1, 0)], Direction::ToPool).unwrap_err();
        assert!(err.to_string().contains("tensor 1 of 1"), "{err}");
        let err = memory.copy(&[seg(0, u64::MAX - 8)], Direction::ToPool).unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
    }

    #[test]
    fn unmapped_memory_gone_processes_and_hidden_pids_are_refused_at_registration() {
        let page = 4096;
        // SAFETY: a private anonymous mapping, unmapped again before use.
        let addr = unsafe {
            let p =
                libc::mmap(std::ptr::null_mut(), page, libc::PROT_READ, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
            assert_ne!(p, libc::MAP_FAILED);
            libc::munmap(p, page);
            p as u64
        };
        let gone = EngineTensor { address: addr, bytes: page as u64, ..Default::default() };
        let err = CmaBackend.import(me(), &[gone]).err().expect("unmapped memory refused");
        assert!(err.to_string().contains("no longer mapped"), "{err}");
        let err = CmaBackend.import(None, &[]).err().expect("no pid refused");
        assert!(err.to_string().contains("PID namespace"), "{err}");
        let zero = EngineTensor::default();
        assert!(CmaBackend.import(me(), &[zero]).is_err());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        // Reaped: its pid names nothing (or, rarely, a new process; either way not this one).
        assert!(CmaBackend.import(Some(pid), &[tensor(&[1u8; 8])]).is_err());
    }
}
