//! The connector's Python pieces, checked with the vLLM venv: the layout module
//! (`client/python/kvtier/layout.py`), which describes vLLM's KV tensors to the daemon for
//! daemon-side copies, on CPU tensors (strides, chunk sizes, the byte order of a pool slot, the
//! layouts it must refuse); and where clients look for the daemon.

use kvtier_tests::{repo, vllm_python};
use std::process::Command;

#[test]
fn the_connector_describes_vllm_kv_layouts_byte_for_byte() {
    let out = Command::new(vllm_python())
        .arg(repo().join("tests/e2e/check_layout.py"))
        .env("PYTHONPATH", repo().join("client/python"))
        .output()
        .expect("run the layout checks");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("LAYOUT OK"), "stdout:\n{stdout}\nstderr:\n{stderr}");
}

#[test]
fn python_clients_find_the_daemon_as_the_cli_does_and_the_connector_says_when_none_listens() {
    let out = Command::new(vllm_python())
        .arg(repo().join("tests/e2e/check_socket.py"))
        .env("PYTHONPATH", repo().join("client/python"))
        .output()
        .expect("run the socket checks");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("SOCKET OK"), "stdout:\n{stdout}\nstderr:\n{stderr}");
}
