//! Default paths, shared by the daemon and its clients so that both agree without configuration.

use std::path::{Path, PathBuf};

/// The per-user runtime directory: `$XDG_RUNTIME_DIR/kvtier`, else `/tmp/kvtier-<uid>`.
pub fn runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => Path::new(&d).join("kvtier"),
        _ => PathBuf::from(format!("/tmp/kvtier-{}", nix::unistd::getuid())),
    }
}

/// The default connector socket path (also what clients try when given none).
pub fn default_socket() -> PathBuf {
    runtime_dir().join("kvtierd.sock")
}

/// The default gRPC unix socket path.
pub fn default_grpc_socket() -> PathBuf {
    runtime_dir().join("kvtierd-grpc.sock")
}
