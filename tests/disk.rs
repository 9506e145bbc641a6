//! The disk tier with real daemons, real O_DIRECT spill files, io_uring and redb: crashes,
//! corruption, configuration changes, a full disk and a dying disk. Whatever happens, a block
//! that is served is byte-exact (`kvtier get` checks every byte and fails otherwise).

use kvtier_daemon::disk_io::format::{SlotHeader, HEADER_BYTES};
use kvtier_daemon::disk_io::spill::SPILL_FILE;
use kvtier_tests::{eventually, eventually_within, ok_stdout, Daemon, LoopFs};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A directory for spill files on the build's disk (O_DIRECT: not tmpfs, which /tmp may be).
fn spill_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// Flags of a daemon with a disk tier in `dir` of `bytes`, writing every block.
fn disk_flags(dir: &Path, bytes: &str) -> Vec<String> {
    ["--disk-dir", &dir.display().to_string(), "--disk-bytes-per-dir", bytes, "--disk-admission", "always"]
        .map(String::from)
        .to_vec()
}

fn start(dir: &Path, bytes: &str) -> Daemon {
    std::fs::create_dir_all(dir).unwrap();
    let flags = disk_flags(dir, bytes);
    Daemon::start_with_metrics(&flags.iter().map(String::as_str).collect::<Vec<_>>(), true)
}

fn restart(d: &mut Daemon, dir: &Path, bytes: &str, more: &[&str]) {
    let mut flags = disk_flags(dir, bytes);
    flags.extend(more.iter().map(|s| s.to_string()));
    d.restart_with(&flags.iter().map(String::as_str).collect::<Vec<_>>());
}

fn put(d: &Daemon, seed: u64, count: usize) -> String {
    put_sized(d, seed, count, 65536)
}

fn put_sized(d: &Daemon, seed: u64, count: usize, block: usize) -> String {
    let args = ["--seed", &seed.to_string(), "--count", &count.to_string(), "--block-bytes", &block.to_string()];
    ok_stdout(&d.kvtier(&[&["put"], &args[..]].concat()))
}

fn spawn_put(d: &Daemon, seed: u64, count: usize) -> Child {
    Command::new(kvtier_tests::bin("kvtier"))
        .args(["put", "--seed", &seed.to_string(), "--count", &count.to_string()])
        .env("KVTIER_SOCKET", &d.socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Loads a test prompt; panics if any loaded byte differs. Returns the blocks loaded.
fn get(d: &Daemon, seed: u64, count: usize) -> usize {
    get_sized(d, seed, count, 65536)
}

fn get_sized(d: &Daemon, seed: u64, count: usize, block: usize) -> usize {
    let args = ["--seed", &seed.to_string(), "--count", &count.to_string(), "--block-bytes", &block.to_string()];
    let out = ok_stdout(&d.kvtier(&[&["get"], &args[..]].concat()));
    let n = out.split_whitespace().nth(1).and_then(|n| n.parse().ok());
    n.unwrap_or_else(|| panic!("unexpected get output: {out}"))
}

/// What the daemon holds of a test prompt: (leading blocks held, of those only on disk).
fn lookup(d: &Daemon, seed: u64, count: usize) -> (usize, usize) {
    let out = ok_stdout(&d.kvtier(&["lookup", "--seed", &seed.to_string(), "--count", &count.to_string()]));
    let nums: Vec<usize> = out.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect();
    match nums[..] {
        [held, _, on_disk] => (held, on_disk),
        _ => panic!("unexpected lookup output: {out}"),
    }
}

fn wait_on_disk(d: &Daemon, blocks: f64) {
    eventually_within(&format!("{blocks} blocks on disk"), 60, || d.metric("kvtier_disk_blocks") >= blocks);
}

#[test]
fn sigkill_during_heavy_demotion_serves_only_exact_blocks() {
    let spill = spill_dir();
    let mut d = start(spill.path(), "512 MiB");
    // Prompts of 300 blocks of 64 KiB through a 32 MiB pool: four at once, then one after
    // another from a background writer until the daemon dies under it.
    let mut writers: Vec<Child> = (1..=4).map(|s| spawn_put(&d, s, 300)).collect();
    for w in &mut writers {
        assert!(w.wait().unwrap().success());
    }
    wait_on_disk(&d, 400.0);
    let before = d.metric("kvtier_disk_demoted_blocks_total");
    let socket = d.socket.clone();
    let writer = std::thread::spawn(move || {
        for seed in 5..=40u64 {
            let ok = Command::new(kvtier_tests::bin("kvtier"))
                .args(["put", "--seed", &seed.to_string(), "--count", "300"])
                .env("KVTIER_SOCKET", &socket)
                .output()
                .is_ok_and(|o| o.status.success());
            if !ok {
                break;
            }
        }
    });
    eventually_within("demotion under way", 60, || d.metric("kvtier_disk_demoted_blocks_total") > before + 300.0);
    d.kill();
    writer.join().unwrap();
    restart(&mut d, spill.path(), "512 MiB", &[]);
    assert!(d.log().contains("disk tier ready") && d.log().contains("restored="), "{}", d.log());
    let restored = d.metric("kvtier_disk_restored_blocks");
    assert!(restored > 300.0, "restored {restored}");
    let loaded: usize = (1..=40).map(|s| get(&d, s, 300)).sum();
    assert!(loaded > 0, "blocks written before the kill are served again");
    assert!(d.metric("kvtier_disk_promoted_blocks_total") > 0.0);
    assert_eq!(d.metric("kvtier_disk_corrupt_blocks_total"), 0.0);
}

/// Offset in the spill file of the slot holding `hash`, found by its self-describing header.
fn find_slot(spill: &Path, hash: &[u8]) -> u64 {
    let bytes = std::fs::read(spill.join(SPILL_FILE)).unwrap();
    (HEADER_BYTES as usize..bytes.len())
        .step_by(4096)
        .find(|&at| SlotHeader::decode(&bytes[at..]).is_ok_and(|h| h.hash.as_bytes() == hash))
        .expect("slot of the block") as u64
}

#[test]
fn a_slot_overwritten_with_garbage_is_not_served_and_is_counted() {
    let spill = spill_dir();
    let mut d = start(spill.path(), "64 MiB");
    put(&d, 1, 40);
    wait_on_disk(&d, 40.0);
    d.terminate();
    let hash = &kvtier_client::testdata::chained_hashes(1, 40)[10];
    let at = find_slot(spill.path(), hash) + HEADER_BYTES + 1000;
    let f = std::fs::OpenOptions::new().write(true).open(spill.path().join(SPILL_FILE)).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"garbage garbage garbage", at).unwrap();
    drop(f);
    restart(&mut d, spill.path(), "64 MiB", &[]);
    assert_eq!(get(&d, 1, 40), 10, "served up to the damaged block, byte-exact");
    assert_eq!(d.metric("kvtier_disk_corrupt_blocks_total"), 1.0);
    assert_eq!(get(&d, 1, 40), 10, "the damaged block is gone for good");
    assert_eq!(d.metric("kvtier_disk_corrupt_blocks_total"), 1.0);
}

/// (model, blocks with a host copy, disk-only blocks) of each namespace, from `kvtier status`.
fn namespace_usage(d: &Daemon) -> Vec<(String, u64, u64)> {
    let json: serde_json::Value = serde_json::from_str(&ok_stdout(&d.kvtier(&["status", "--json"]))).unwrap();
    (json["namespace_usage"].as_array().unwrap().iter())
        .map(|u| {
            (
                u["model"].as_str().unwrap().to_string(),
                u["host_blocks"].as_u64().unwrap(),
                u["disk_blocks"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn restart_with_a_smaller_moved_or_recut_spill_file() {
    let spill = spill_dir();
    let first = spill.path().join("a");
    let mut d = start(&first, "64 MiB");
    put(&d, 1, 100);
    wait_on_disk(&d, 100.0);
    d.terminate();

    // Smaller: 3 slabs of 1 MiB hold 45 slots of 68 KiB; the rest is dropped with a message.
    restart(&mut d, &first, "4 MiB", &[]);
    assert!(d.log().contains("resized from 63 to 3 slabs"), "{}", d.log());
    assert_eq!(d.metric("kvtier_disk_restored_blocks"), 45.0);
    assert_eq!(namespace_usage(&d), [(String::new(), 0, 45)], "restored, not registered since");
    let loaded = get(&d, 1, 100);
    assert!((1..=45).contains(&loaded), "{loaded}");
    assert_eq!(namespace_usage(&d), [("kvtier-cli-test".to_string(), loaded as u64, 45 - loaded as u64)]);
    d.terminate();

    // Moved: the directory (spill file and index together) is found at its new place.
    let moved = spill.path().join("b");
    std::fs::rename(&first, &moved).unwrap();
    restart(&mut d, &moved, "4 MiB", &[]);
    assert_eq!(d.metric("kvtier_disk_restored_blocks"), 45.0);
    assert_eq!(get(&d, 1, 100), loaded);
    d.terminate();

    // Re-cut into other slabs: nothing can be trusted, the file starts empty, with a message.
    restart(&mut d, &moved, "4 MiB", &["--pool-bytes", "32 MiB", "--slab-bytes", "2 MiB"]);
    assert!(d.log().contains("starting it empty"), "{}", d.log());
    assert_eq!(get(&d, 1, 100), 0);
}

/// Bytes free to unprivileged writers on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(dir).unwrap();
    s.blocks_available() * s.fragment_size()
}

#[test]
fn a_full_disk_at_start_stops_the_daemon_and_leaves_nothing_behind() {
    // Trust finding 6: the partial file stayed (the filesystem full after exit), and the message
    // said "0 B free" where 253 MB were.
    let fs = LoopFs::new(32);
    let spill = fs.mount.join("spill");
    std::fs::create_dir(&spill).unwrap();
    let free = free_bytes(&fs.mount);
    let flags = disk_flags(&spill, "64 MiB");
    let stderr = Daemon::start_refused(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(stderr.contains("disk full: cannot preallocate") && stderr.contains("--disk-optional"), "{stderr}");
    assert!(!stderr.contains("(0 B free"), "the space free before the attempt is reported: {stderr}");
    assert!(!spill.join(SPILL_FILE).exists(), "the partial spill file is removed");
    assert!(free_bytes(&fs.mount) + (1 << 20) >= free, "its space is handed back");

    // Where the operator opts in: host-only, reported not ready with the reason.
    let mut optional = flags.clone();
    optional.push("--disk-optional".into());
    let mut d = Daemon::start_with_metrics(&optional.iter().map(String::as_str).collect::<Vec<_>>(), true);
    assert_eq!((d.metric("kvtier_disk_configured"), d.metric("kvtier_disk_enabled")), (1.0, 0.0));
    assert_eq!(d.metric("kvtier_ready"), 0.0);
    assert!(d.http_get("/readyz").contains("not ready: disk tier off: disk full"), "{}", d.http_get("/readyz"));
    put(&d, 1, 20);
    assert_eq!(get(&d, 1, 20), 20);
    let status = ok_stdout(&d.kvtier(&["status"]));
    assert!(status.contains("disk tier OFF: disk full") && status.contains("NOT READY"), "{status}");
    assert!(d.is_running());
}

#[test]
fn a_missing_spill_directory_is_never_created() {
    // Fail safe: a spill directory on a device that is not mounted must not land on the root disk.
    let spill = spill_dir();
    let missing = spill.path().join("not-mounted");
    let flags = disk_flags(&missing, "16 MiB");
    let stderr = Daemon::start_refused(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(stderr.contains("does not exist") && stderr.contains("never creates it"), "{stderr}");
    assert!(!missing.exists());
}

#[test]
fn a_disk_filling_up_at_run_time_degrades_to_host_only() {
    let fs = LoopFs::new(40);
    let mut d = start(&fs.mount.join("spill"), "24 MiB");
    // Small blocks: many index entries per spill byte, so the index must grow.
    put_sized(&d, 1, 20, 4096);
    wait_on_disk(&d, 20.0);
    fs.fill();
    for seed in 2..=40 {
        put_sized(&d, seed, 400, 4096);
        if d.metric("kvtier_disk_enabled") == 0.0 {
            break;
        }
    }
    eventually_within("the disk tier gave up", 60, || d.metric("kvtier_disk_enabled") == 0.0);
    assert!(d.log().contains("disk tier FAILED"), "{}", d.log());
    assert!(d.is_running());
    put(&d, 99, 20);
    assert_eq!(get(&d, 99, 20), 20, "host tier still serves");
}

#[test]
fn io_errors_degrade_to_host_only_and_nothing_wrong_is_served() {
    let fs = LoopFs::new(96);
    let spill = fs.mount.join("spill");
    let mut d = start(&spill, "64 MiB");
    // A prompt written to disk, then a restart (SIGTERM): its blocks are disk-only. Which blocks
    // of a pool under pressure end up disk-only depends on how the demoter keeps up with the
    // saves (a loaded CI machine once left none), so the restart makes it certain.
    put(&d, 1, 200);
    wait_on_disk(&d, 200.0);
    d.terminate();
    restart(&mut d, &spill, "64 MiB", &[]);
    assert_eq!(lookup(&d, 1, 200), (200, 200), "all on disk only");
    put(&d, 2, 100);
    let in_host = lookup(&d, 2, 100);
    fs.shut_down();
    assert_eq!(get(&d, 1, 200), 0, "disk-only blocks cannot be read any more, and nothing else is served");
    eventually("the disk tier gave up", || d.metric("kvtier_disk_enabled") == 0.0);
    assert!(d.log().contains("disk tier FAILED"), "{}", d.log());
    assert_eq!(lookup(&d, 1, 200), (0, 0), "forgotten");
    assert_eq!((in_host, get(&d, 2, 100)), ((100, 0), 100), "host copies are still served");
    put(&d, 4, 50);
    assert_eq!(get(&d, 4, 50), 50, "saves keep working, host-only");
    assert!(d.is_running());
    let status = ok_stdout(&d.kvtier(&["status"]));
    assert!(status.contains("disk tier OFF"), "{status}");
}

/// Slot headers found in the spill file of `dir`.
fn slots_in(dir: &Path) -> usize {
    let bytes = std::fs::read(dir.join(SPILL_FILE)).unwrap();
    (HEADER_BYTES as usize..bytes.len()).step_by(4096).filter(|&at| SlotHeader::decode(&bytes[at..]).is_ok()).count()
}

#[test]
fn two_spill_directories_share_the_writes_and_both_come_back() {
    let spill = spill_dir();
    let (a, b) = (spill.path().join("nvme0"), spill.path().join("nvme1"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let dirs = format!("{},{}", a.display(), b.display());
    let flags = ["--disk-dir", &dirs, "--disk-bytes-per-dir", "16 MiB", "--disk-admission", "always"];
    let mut d = Daemon::start_with_metrics(&flags, true);
    put(&d, 1, 100);
    wait_on_disk(&d, 100.0);
    d.terminate();
    assert!(slots_in(&a) > 0 && slots_in(&b) > 0, "slabs alternate between the files");
    assert_eq!(slots_in(&a) + slots_in(&b), 100);
    d.restart();
    assert_eq!(d.metric("kvtier_disk_restored_blocks"), 100.0);
    assert_eq!(get(&d, 1, 100), 100);
}

fn discard(d: &Daemon, selection: &[&str]) -> serde_json::Value {
    let out = ok_stdout(&d.kvtier(&[&["discard", "--json"], selection].concat()));
    serde_json::from_str(out.lines().next().unwrap_or_default()).unwrap()
}

#[test]
fn discard_removes_one_model_from_both_tiers_and_for_good() {
    let spill = spill_dir();
    let mut d = start(spill.path(), "64 MiB");
    put(&d, 1, 100);
    ok_stdout(&d.kvtier(&["put", "--model", "other", "--seed", "2", "--count", "20"]));
    wait_on_disk(&d, 120.0);

    let r = discard(&d, &["--model", "kvtier-cli-test"]);
    assert_eq!((r["namespaces"].as_u64(), r["busy_blocks"].as_u64()), (Some(1), Some(0)), "{r}");
    assert_eq!(r["host_blocks"].as_u64().unwrap() + r["disk_blocks"].as_u64().unwrap(), 100, "{r}");
    assert_eq!(get(&d, 1, 100), 0, "nothing of the discarded model is served");
    assert_eq!(d.metric("kvtier_discarded_blocks_total"), 100.0);
    eventually("its disk copies freed", || d.metric("kvtier_disk_blocks") == 20.0);
    let usage = namespace_usage(&d);
    assert_eq!(usage, [("kvtier-cli-test".to_string(), 0, 0), ("other".to_string(), 20, 0)]);
    let nothing = d.kvtier(&["discard", "--model", "no-such-model"]);
    assert!(!nothing.status.success() && String::from_utf8_lossy(&nothing.stderr).contains("no namespace matches"));

    // The disk index forgot them: a restart restores only the other model's blocks.
    d.terminate();
    restart(&mut d, spill.path(), "64 MiB", &[]);
    assert_eq!(d.metric("kvtier_disk_restored_blocks"), 20.0);
    assert_eq!(get(&d, 1, 100), 0);
    let args = ["--model", "other", "--seed", "2", "--count", "20"];
    assert_eq!(ok_stdout(&d.kvtier(&[&["get"], &args[..]].concat())).split_whitespace().nth(1), Some("20"));

    // By id prefix, as `kvtier status` shows it; the freed room takes new blocks.
    let json: serde_json::Value = serde_json::from_str(&ok_stdout(&d.kvtier(&["status", "--json"]))).unwrap();
    let usage = json["namespace_usage"].as_array().unwrap();
    let other = usage.iter().find(|u| u["model"] == "other").unwrap()["id_prefix"].as_str().unwrap().to_string();
    let r = discard(&d, &["--namespace", &other]);
    assert_eq!((r["namespaces"].as_u64(), r["host_blocks"].as_u64()), (Some(1), Some(20)), "{r}");
    assert_eq!(ok_stdout(&d.kvtier(&[&["get"], &args[..]].concat())).split_whitespace().nth(1), Some("0"));
    put(&d, 3, 100);
    assert_eq!(get(&d, 3, 100), 100);
}
