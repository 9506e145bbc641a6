//! Default paths, shared by the daemon and its clients so that both agree without configuration.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// The socket of a node's system daemon (the Kubernetes DaemonSet's, `deploy/kubernetes`).
pub const SYSTEM_SOCKET: &str = "/run/kvtier/kvtierd.sock";

/// The per-user runtime directory: `$XDG_RUNTIME_DIR/kvtier`, else `/tmp/kvtier-<uid>`.
pub fn runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => Path::new(&d).join("kvtier"),
        _ => PathBuf::from(format!("/tmp/kvtier-{}", nix::unistd::getuid())),
    }
}

/// Where the daemon listens by default: `kvtierd.sock` in the runtime directory of the user it
/// runs as.
pub fn daemon_socket() -> PathBuf {
    runtime_dir().join("kvtierd.sock")
}

/// Where clients look for a daemon when given no socket, in order: this user's own daemon, the
/// node's system daemon, and a daemon root started by hand (`/tmp/kvtier-0`).
pub fn socket_candidates() -> Vec<PathBuf> {
    let mut out = vec![daemon_socket(), PathBuf::from(SYSTEM_SOCKET), PathBuf::from("/tmp/kvtier-0/kvtierd.sock")];
    out.dedup();
    out
}

/// The socket clients use when given none: the first of [`socket_candidates`] that is a
/// socket, else this user's own (which then names the path in the "not found" error).
pub fn default_socket() -> PathBuf {
    let candidates = socket_candidates();
    let is_socket = |p: &&PathBuf| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket());
    candidates.iter().find(is_socket).cloned().unwrap_or_else(|| candidates[0].clone())
}

/// The default gRPC unix socket path.
pub fn default_grpc_socket() -> PathBuf {
    runtime_dir().join("kvtierd-grpc.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_try_their_own_daemon_then_the_nodes_then_roots() {
        let c = socket_candidates();
        assert_eq!(c[0], daemon_socket());
        assert!(c.contains(&PathBuf::from(SYSTEM_SOCKET)));
        assert_eq!(c.last().unwrap(), &PathBuf::from("/tmp/kvtier-0/kvtierd.sock"));
    }
}
