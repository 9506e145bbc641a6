//! The connector's layout module (`client/python/kvtier/layout.py`), which describes vLLM's KV
//! tensors to the daemon for daemon-side copies, checked on CPU tensors with the vLLM venv's
//! torch: strides, chunk sizes, the byte order of a pool slot, and the layouts it must refuse.

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
