//! The connector's Python pieces, checked with the vLLM venv: the layout module
//! (`client/python/kvtier/layout.py`), which describes vLLM's KV tensors to the daemon for
//! daemon-side copies, on CPU tensors (strides, chunk sizes, the byte order of a pool slot, the
//! layouts it must refuse); and where clients look for the daemon.

use kvtier_tests::{repo, vllm_python};
use std::process::Command;

/// Runs `tests/e2e/<script>` with the connector on the path; passes if it prints `ok_line`.
fn python_check(script: &str, ok_line: &str) {
    let out = Command::new(vllm_python())
        .arg(repo().join("tests/e2e").join(script))
        .env("PYTHONPATH", repo().join("client/python"))
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains(ok_line), "stdout:\n{stdout}\nstderr:\n{stderr}");
}

#[test]
fn the_connector_describes_vllm_kv_layouts_byte_for_byte() {
    python_check("check_layout.py", "LAYOUT OK");
}

#[test]
fn python_clients_find_the_daemon_as_the_cli_does_and_the_connector_says_when_none_listens() {
    python_check("check_socket.py", "SOCKET OK");
}
