//! Supervised background work (issue 20): a panic or a stall injected into each background part
//! (`KVTIER_FAULT`) turns off only what that part served, visibly (the part's metric, readiness,
//! the health detail, `kvtier status`, an error log naming it), and the daemon keeps serving the
//! rest. Before, the demoter's panic left the disk tier silently dead with health SERVING.

use kvtier_client::testdata;
use kvtier_tests::{
    eventually_within, flash_attention_kv_cache, namespace, ok_stdout, refs, Daemon, TRANSFER_OVER_TCP,
};

/// `kvtier_part_up` of `part` (None: no such part).
fn part_up(d: &Daemon, part: &str) -> Option<f64> {
    let prefix = format!("kvtier_part_up{{part=\"{part}\"");
    let metrics = d.http_get("/metrics");
    metrics.lines().find(|l| l.starts_with(&prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A daemon with a disk tier writing every block, stall bound 2 s, and `fault` injected.
fn daemon(fault: &str, extra: &[&str]) -> (Daemon, tempfile::TempDir) {
    let spill = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut flags = vec!["--disk-dir", spill.path().to_str().unwrap(), "--disk-bytes-per-dir", "32 MiB"];
    flags.extend(["--disk-admission", "always", "--stall-after-secs", "2"]);
    flags.extend(extra);
    (Daemon::start_with_env(&flags, true, &[("KVTIER_FAULT", fault)]), spill)
}

fn put(d: &Daemon, seed: u64, count: usize) {
    ok_stdout(&d.kvtier(&["put", "--seed", &seed.to_string(), "--count", &count.to_string()]));
}

fn get(d: &Daemon, seed: u64, count: usize) -> String {
    ok_stdout(&d.kvtier(&["get", "--seed", &seed.to_string(), "--count", &count.to_string()]))
}

/// Waits for `part` to be down, then checks it is reported everywhere and that saves and loads
/// still work.
fn reported_and_still_serving(d: &Daemon, part: &str, serves: &str, why: &str) {
    eventually_within(&format!("{part} reported down"), 30, || part_up(d, part) == Some(0.0));
    assert_eq!(d.metric("kvtier_ready"), 0.0);
    let ready = d.http_get("/readyz");
    assert!(ready.contains(&format!("{part} ({serves} off): {why}")), "{ready}");
    let status = ok_stdout(&d.kvtier(&["status"]));
    assert!(status.contains("NOT READY") && status.contains(part), "{status}");
    eventually_within("the error log", 10, || d.log().contains(&format!("{part} FAILED")));
    put(d, 99, 16);
    assert!(get(d, 99, 16).contains("16"), "the host tier still serves");
}

#[test]
fn disk_parts_that_panic_or_stall_turn_off_the_disk_tier_only() {
    for (fault, part, why) in [
        ("demoter:panic", "demoter", "panicked: fault injected into demoter"),
        ("demoter:stall", "demoter", "stalled"),
        ("persister:panic", "persister", "panicked: fault injected into persister"),
        ("persister:stall", "persister", "stalled"),
        ("ring:panic", "ring-0", "panicked: fault injected into ring-0"),
        ("ring:stall", "ring-0", "stalled"),
    ] {
        let (mut d, _spill) = daemon(fault, &[]);
        // Work for the part: saves the demoter writes back, the ring writes, the persister records.
        put(&d, 1, 32);
        reported_and_still_serving(&d, part, "disk tier", why);
        eventually_within(&format!("{fault}: the disk tier off"), 10, || d.metric("kvtier_disk_enabled") == 0.0);
        assert!(d.is_running(), "{fault}");
        assert!(part_up(&d, "load") == Some(1.0), "{fault}: other parts keep working");
    }
}

#[test]
fn a_promotion_that_panics_turns_off_the_disk_tier_and_the_load_is_a_miss() {
    let (mut d, _spill) = daemon("promoter:panic", &[]);
    put(&d, 1, 32);
    eventually_within("written to disk", 30, || d.metric("kvtier_disk_blocks") >= 32.0);
    d.terminate();
    d.restart();
    // Disk-only now: the load promotes, the promotion panics, the load is a miss.
    assert!(get(&d, 1, 32).starts_with("loaded 0 of"), "nothing half-promoted is served");
    reported_and_still_serving(&d, "promoter", "disk tier", "a promotion panicked: fault injected into promoter");
    assert_eq!(d.metric("kvtier_disk_enabled"), 0.0);
}

#[test]
fn a_peer_lane_that_panics_or_stalls_turns_off_peer_transfers_only() {
    for (fault, why) in [("lane:panic", "panicked: fault injected into lane-0"), ("lane:stall", "stalled")] {
        let (d, _spill) = daemon(fault, TRANSFER_OVER_TCP);
        reported_and_still_serving(&d, "lane-0", "daemon-to-daemon transfers", why);
        assert_eq!(d.metric("kvtier_disk_enabled"), 1.0, "{fault}: the disk tier is not affected");
    }
}

#[test]
fn the_load_sampler_that_panics_or_stalls_is_reported() {
    for (fault, why) in [("load:panic", "panicked: fault injected into load"), ("load:stall", "stalled")] {
        let (d, _spill) = daemon(fault, &[]);
        reported_and_still_serving(&d, "load", "load signal", why);
        assert_eq!(d.metric("kvtier_disk_enabled"), 1.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_side_copies_that_panic_or_stall_are_turned_off_and_clients_copy_themselves() {
    const BLOCKS: u64 = 8;
    const CHUNK: u64 = 4096;
    for (fault, why) in [("copies:panic", "a copy panicked: fault injected into copies"), ("copies:stall", "stalled")] {
        let (d, _spill) = daemon(fault, &[]);
        let tensors: Vec<Vec<u8>> = (0..2).map(|l| vec![l as u8 + 1; (2 * BLOCKS * CHUNK) as usize]).collect();
        let mut c = d.client("engine").await;
        let ns = c.register(namespace("m", 2 * 2 * CHUNK)).await.unwrap();
        let views: Vec<&[u8]> = tensors.iter().map(|t| &t[..]).collect();
        let reply = c.register_kv_cache(flash_attention_kv_cache(ns.handle, &views, BLOCKS, CHUNK)).await.unwrap();
        assert!(reply.error.is_empty(), "{}", reply.error);
        let hashes = testdata::chained_hashes(3, 2);
        let save = kvtier_proto::v1::SaveKv {
            cache: reply.cache,
            hashes: hashes.clone(),
            block_ids: vec![0, 1],
            ..Default::default()
        };
        if fault == "copies:panic" {
            let saved = c.save_kv(save).await.unwrap();
            assert!(saved.error.contains("panicked"), "{saved:?}");
        } else {
            // The stalled copy holds its own request (its slots stay reserved until it ends);
            // the next engine is told to copy itself.
            tokio::spawn(async move { c.save_kv(save).await });
        }
        let d = tokio::task::spawn_blocking(move || {
            reported_and_still_serving(&d, "copies", "daemon-side copies", why);
            d
        })
        .await
        .unwrap();
        let mut next = d.client("next").await;
        let ns = next.register(namespace("m", 2 * 2 * CHUNK)).await.unwrap();
        let again = next.register_kv_cache(flash_attention_kv_cache(ns.handle, &views, BLOCKS, CHUNK)).await.unwrap();
        assert!(again.error.contains("daemon-side copies are off"), "{fault}: {again:?}");
        let blocks: Vec<Vec<u8>> = (0..2).map(|i| vec![i as u8; (4 * CHUNK) as usize]).collect();
        let fresh = testdata::chained_hashes(4, 2);
        assert_eq!(next.save(&ns, &fresh, &refs(&blocks)).await.unwrap().stored, 2, "copying itself works");
    }
}
