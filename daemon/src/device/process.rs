//! The engine process at the other end of a connector socket, held as a pidfd: a pid alone may
//! name another process once the engine has exited.

use super::DeviceError;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// An engine process (pid as SO_PEERCRED reports it in the daemon's PID namespace).
pub struct EngineProcess {
    /// Its pid.
    pub pid: i32,
    pidfd: OwnedFd,
}

impl EngineProcess {
    /// Holds process `pid`; fails if it is gone already.
    pub fn open(pid: i32) -> Result<Self, DeviceError> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(DeviceError::Memory(format!("engine process {pid}: {}", std::io::Error::last_os_error())));
        }
        // SAFETY: a fresh fd that nothing else owns.
        Ok(Self { pid, pidfd: unsafe { OwnedFd::from_raw_fd(fd as i32) } })
    }

    /// Fails once the process has exited.
    pub fn alive(&self) -> Result<(), DeviceError> {
        let mut fds = [libc::pollfd { fd: self.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        // SAFETY: one valid pollfd, no waiting.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
        match ready {
            0 => Ok(()),
            _ => Err(DeviceError::Memory(format!("engine process {} has exited", self.pid))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_alive_until_it_exits() {
        let me = EngineProcess::open(std::process::id() as i32).unwrap();
        assert!(me.alive().is_ok());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let held = EngineProcess::open(child.id() as i32).unwrap();
        child.wait().unwrap();
        let err = held.alive().unwrap_err().to_string();
        assert!(err.contains("has exited"), "{err}");
        assert!(EngineProcess::open(i32::MAX).is_err(), "no such process");
    }
}
