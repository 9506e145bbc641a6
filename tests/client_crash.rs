//! A client SIGKILLed in the middle of a save leaves no visible block and no leaked slot.

use kvtier_client::testdata;
use kvtier_tests::{bin, blocks_for, eventually, namespace, refs, Daemon};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_writer_leaves_nothing_behind() {
    let d = Daemon::start(&[]);
    let block = 64 * 1024usize;
    // 32 MiB of 1 MiB slabs, 16 slots each: 512 slots.
    let capacity = 512;
    let mut writer = Command::new(bin("kvtier"))
        .args([
            "put",
            "--count",
            "300",
            "--seed",
            "5",
            "--block-bytes",
            &block.to_string(),
            "--pause-before-commit",
            "600",
        ])
        .env("KVTIER_SOCKET", &d.socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(writer.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "reserved 300");

    let mut c = d.client("observer").await;
    // The namespace `kvtier put` uses for its test blocks.
    let cli_ns = kvtier_client::NamespaceDescriptor {
        model: "kvtier-cli-test".into(),
        layout: format!("opaque-{block}"),
        block_bytes: block as u64,
        ..Default::default()
    };
    let ns = c.register(cli_ns).await.unwrap();
    let hashes = testdata::chained_hashes(5, 300);
    assert_eq!(c.lookup(&ns, &hashes).await.unwrap(), 0, "reserved blocks are invisible");
    let stats = c.stats().await.unwrap();
    assert_eq!(stats.tiers[0].used_bytes, 300 * block as u64);

    writer.kill().unwrap(); // SIGKILL
    writer.wait().unwrap();

    let rt = tokio::runtime::Handle::current();
    eventually("the killed client's slots are freed", || {
        let used = tokio::task::block_in_place(|| rt.block_on(c.stats())).unwrap().tiers[0].used_bytes;
        used == 0
    });
    assert_eq!(c.lookup(&ns, &hashes).await.unwrap(), 0, "nothing of the killed save is visible");
    let stats = c.stats().await.unwrap();
    assert_eq!(stats.tiers[0].blocks, 0);

    // Every slot is usable again: the whole pool takes a full save of fresh blocks.
    let other = c.register(namespace("after-crash", block as u64)).await.unwrap();
    let fresh = testdata::chained_hashes(6, capacity);
    let report = c.save(&other, &fresh, &refs(&blocks_for(&fresh, block))).await.unwrap();
    assert_eq!(report.stored, capacity, "{report:?}");
}
