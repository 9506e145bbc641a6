//! GPU backend: offload (engine KV tensors -> pool) and onload (pool -> tensors) of many blocks
//! across all layers with one `kvtier_copy` launch, against pinned `cuMemcpy` of the same bytes
//! (one contiguous device buffer <-> the same registered pool), same run, ratio printed (goal:
//! 0.8x or better). Layout: vLLM FlashAttention (per layer `[2, blocks, 16 tokens, 8 heads, 128]` fp16),
//! 32 layers, 512 blocks of 2 MiB moved (1 GiB), then 16 (32 MiB, where fixed costs show). Needs an NVIDIA GPU, its driver and NVRTC (the
//! `device` tool's machine); elsewhere it prints that it skipped.
//!
//! `cargo bench -p kvtier-benches --bench gpu_copy`

use kvtier_daemon::device::cuda::cudarc::driver::{sys, CudaEvent, CudaStream, DevicePtr};
use kvtier_daemon::device::cuda::{driver_present, nvrtc_present, CudaBackend};
use kvtier_daemon::device::gather::{kernel_args, Direction, KernelArgs};
use kvtier_daemon::device::layout::KvLayout;
use kvtier_daemon::pool::{HostPool, LockMode, PoolGeometry};
use std::sync::Arc;

const LAYERS: usize = 32;
const ENGINE_BLOCKS: u64 = 1024;
const MOVED: u64 = 512;
const CHUNK: u64 = 16 * 8 * 128 * 2;
const ROUNDS: usize = 5;

/// Best GB/s of `rounds` runs of `op` (queued on `stream`, timed by events around it).
fn best(stream: &Arc<CudaStream>, bytes: u64, rounds: usize, mut op: impl FnMut()) -> f64 {
    let ctx = stream.context();
    let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    (0..rounds)
        .map(|_| {
            let (start, end): (CudaEvent, CudaEvent) = (ctx.new_event(timing).unwrap(), ctx.new_event(timing).unwrap());
            start.record(stream).unwrap();
            op();
            end.record(stream).unwrap();
            bytes as f64 / (start.elapsed_ms(&end).unwrap() as f64 / 1e3) / 1e9
        })
        .fold(0.0, f64::max)
}

fn main() {
    if !driver_present() || !nvrtc_present() {
        println!("gpu_copy: skipped (no CUDA driver and NVRTC on this machine)");
        return;
    }
    let layout = KvLayout::flash_attention(LAYERS, ENGINE_BLOCKS, CHUNK);
    let bytes = MOVED * layout.block_bytes();
    let geometry = PoolGeometry::plan(bytes, bytes, 4 << 20).unwrap();
    let pool = HostPool::create(geometry, false, LockMode::BestEffort).unwrap();
    let backend = CudaBackend::open(&pool).unwrap();
    let stream = backend.stream().clone();
    let tensors: Vec<_> = layout.tensor_bytes.iter().map(|&n| stream.alloc_zeros::<u8>(n as usize).unwrap()).collect();
    let bases: Vec<u64> = tensors.iter().map(|t| t.device_ptr(&stream).0).collect();
    let contiguous = stream.alloc_zeros::<u8>(bytes as usize).unwrap();
    let contiguous_ptr = contiguous.device_ptr(&stream).0;
    let pool_host = pool.segments()[0].as_ptr();
    let pool_dev = backend.pool_device_address(pool_host as usize).unwrap();
    let cu = stream.cu_stream();
    println!(
        "gpu_copy on {}: blocks of {} KiB x {LAYERS} layers, segments of {} KiB",
        backend.device_name(),
        (CHUNK * 2) >> 10,
        CHUNK >> 10
    );
    println!("{:>10} {:>22} {:>22} {:>7}", "direction", "kvtier_copy (gather)", "pinned cuMemcpy", "ratio");
    // 1 GiB, then a 256-token prefix of this model (16 blocks, 32 MiB), where fixed costs show.
    for (moved, rounds) in [(MOVED, ROUNDS), (16, 20)] {
        let bytes = moved * layout.block_bytes();
        // Every other engine block, into consecutive slots: no two chunks merge.
        let blocks: Vec<(u64, u64)> = (0..moved).map(|k| (2 * k, pool_dev + k * layout.block_bytes())).collect();
        let plan = layout.plan(&blocks).unwrap();
        let args = |d| kernel_args(&plan, &bases, d, 256 << 10).unwrap();
        let (save, load): (KernelArgs, KernelArgs) = (args(Direction::ToPool), args(Direction::ToEngine));
        // SAFETY (all raw copies below): the pool is registered and `contiguous` holds `bytes`.
        let memcpy_dtoh = best(&stream, bytes, rounds, || unsafe {
            sys::cuMemcpyDtoHAsync_v2(pool_host.cast(), contiguous_ptr, bytes as usize, cu).result().unwrap()
        });
        let offload = best(&stream, bytes, rounds, || drop(backend.launch(&save, None).unwrap()));
        let memcpy_htod = best(&stream, bytes, rounds, || unsafe {
            sys::cuMemcpyHtoDAsync_v2(contiguous_ptr, pool_host.cast(), bytes as usize, cu).result().unwrap()
        });
        let onload = best(&stream, bytes, rounds, || drop(backend.launch(&load, None).unwrap()));
        println!("{moved} blocks ({} MiB, {} segments), best of {rounds}:", bytes >> 20, plan.len());
        for (name, ours, reference) in [("offload", offload, memcpy_dtoh), ("onload", onload, memcpy_htod)] {
            println!("{name:>10} {:>17.2} GB/s {:>17.2} GB/s {:>6.2}x", ours, reference, ours / reference);
        }
    }
}
