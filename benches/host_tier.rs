//! Host-tier save and load through a real kvtierd, against memcpy of the same bytes with the same
//! block size in the same run, for both kinds of client (`docs/security.md`): **staged** (the
//! default: the client copies into its private window, the daemon copies between the window and
//! the pool) and **trusted** (`--trusted-uid`: the client maps the pool and copies once).
//! Goal: >= 0.9x memcpy trusted; staged says what the isolation costs.
//!
//! `cargo build --release --bins && cargo bench -p kvtier-benches --bench host_tier`

use kvtier_tests::{namespace, Daemon};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let hugetlb = std::env::var_os("KVTIER_BENCH_HUGETLB").is_some();
    let mut args = vec!["--pool-bytes", "1 GiB", "--slab-bytes", "16 MiB"];
    if hugetlb {
        args.push("--hugetlb");
    }
    let uid = nix::unistd::getuid().to_string();
    let staged = Daemon::start(&args);
    let trusted = Daemon::start(&[&args[..], &["--trusted-uid", &uid]].concat());
    println!(
        "host tier: save/load through kvtierd vs memcpy, 256 MiB per round, best of 10 rounds{}",
        if hugetlb { ", hugetlb pool" } else { "" }
    );
    println!(
        "{:>10} {:>8} {:>12} {:>12} {:>8} {:>12} {:>8}",
        "block", "client", "memcpy", "save", "ratio", "load", "ratio"
    );
    for block in [16u64 << 10, 256 << 10, 2 << 20] {
        for (mode, d) in [("staged", &staged), ("trusted", &trusted)] {
            let mut c = d.client("bench-host-tier").await;
            assert_eq!(c.hello().staged, mode == "staged");
            let ns = c.register(namespace(&format!("bench-{block}"), block)).await.unwrap();
            let r = kvtier_client::bench::measure(&mut c, &ns, 256 << 20, 10, false, None).await.unwrap();
            let g = |bps: f64| format!("{:.2} GB/s", bps / 1e9);
            println!(
                "{:>10} {:>8} {:>12} {:>12} {:>7.2}x {:>12} {:>7.2}x",
                format!("{} KiB", block >> 10),
                mode,
                g(r.memcpy_bps),
                g(r.save_bps),
                r.save_bps / r.memcpy_bps,
                g(r.load_bps),
                r.load_bps / r.memcpy_bps
            );
        }
    }
}
