//! Operating the daemon: configuration layering, metrics, status, `kvtier top`, and the trace
//! simulator CLI.

use kvtier_tests::{bin, ok_stdout, Daemon};
use std::io::{BufRead, BufReader, Lines};
use std::path::PathBuf;
use std::process::{ChildStdout, Command, Stdio};

fn kvtierd(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(bin("kvtierd"));
    cmd.args(args).env_remove("KVTIER_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn config_layers_defaults_file_env_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kvtierd.toml");
    std::fs::write(&file, "[pool]\nbytes = \"64 MiB\"\nslab_bytes = \"2 MiB\"\n[policy]\neviction = \"lru\"\n")
        .unwrap();
    let out = kvtierd(&["--print-config"], &[]);
    let defaults = ok_stdout(&out);
    assert!(defaults.contains("eviction = \"prefix-lfu\""), "{defaults}");
    assert!(defaults.contains("kvtierd.sock"), "{defaults}");

    let f = file.to_str().unwrap();
    let from_file = ok_stdout(&kvtierd(&["--print-config", "--config", f], &[]));
    assert!(from_file.contains("bytes = \"64.0 MiB\"") && from_file.contains("eviction = \"lru\""), "{from_file}");

    // Environment over the file, flags over the environment.
    let layered = ok_stdout(&kvtierd(
        &["--print-config", "--socket", "/tmp/flag.sock"],
        &[("KVTIER_CONFIG", f), ("KVTIER_POOL_BYTES", "128 MiB"), ("KVTIER_SOCKET", "/tmp/env.sock")],
    ));
    assert!(layered.contains("bytes = \"128.0 MiB\""), "{layered}");
    assert!(layered.contains("socket = \"/tmp/flag.sock\""), "{layered}");
    assert!(layered.contains("slab_bytes = \"2.0 MiB\""), "{layered}");
}

#[test]
fn bad_configuration_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[pool]\nbites = 3\n").unwrap();
    let out = kvtierd(&["--config", file.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bites"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = kvtierd(&["--pool-bytes", "1 MiB", "--slab-bytes", "16 MiB"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("smaller than one slab"));
}

#[test]
fn metrics_and_status_show_the_host_tier() {
    let d = Daemon::start_with_metrics(&[], true);
    ok_stdout(&d.kvtier(&["put", "--count", "10", "--block-bytes", "8192"]));
    ok_stdout(&d.kvtier(&["get", "--count", "12", "--block-bytes", "8192"]));
    let status = ok_stdout(&d.kvtier(&["status"]));
    assert!(status.contains("10 blocks"), "{status}");
    assert!(status.contains("32.0 MiB"), "{status}");
    let gpu = kvtier_daemon::device::cuda::driver_present() || kvtier_daemon::device::rocm::driver_present();
    assert!(gpu || status.contains("device backend: cma, the daemon copies engine KV memory"), "{status}");
    let m = d.http_get("/metrics");
    for line in [
        "kvtier_host_capacity_bytes 33554432",
        "kvtier_host_used_bytes 81920",
        "kvtier_host_blocks 10",
        "kvtier_saved_bytes_total 81920",
        "kvtier_loaded_bytes_total 81920",
        "kvtier_request_duration_seconds_count{op=\"reserve\"} 1",
    ] {
        assert!(m.contains(line), "missing {line:?} in\n{m}");
    }
    // The CLI processes have exited; the daemon notices each disconnect shortly after.
    kvtier_tests::eventually("clients gauge back to 0", || {
        d.http_get("/metrics").contains("kvtier_connected_clients 0\n")
    });
    assert_eq!(d.http_get("/healthz").trim(), "ok");

    // Every counter is declared once: Stats carries what /metrics exports, and `kvtier status
    // --counters` lists each with its help.
    let json: serde_json::Value = serde_json::from_str(&ok_stdout(&d.kvtier(&["status", "--json"]))).unwrap();
    let m = d.http_get("/metrics");
    let counters = json["counters"].as_object().unwrap();
    assert!(counters.len() > 30, "{json}");
    for (name, value) in counters {
        if name != "kvtier_connected_clients" && name != "kvtier_connections_total" {
            assert!(m.contains(&format!("\n{name} {value}\n")), "{name} {value} not in /metrics:\n{m}");
        }
    }
    let listed = ok_stdout(&d.kvtier(&["status", "--counters"]));
    assert!(listed.contains("kvtier_host_blocks") && listed.contains("Committed blocks in the host tier."), "{listed}");

    // Per namespace: another model's blocks are counted apart.
    ok_stdout(&d.kvtier(&["put", "--count", "4", "--block-bytes", "16384", "--model", "other"]));
    let json: serde_json::Value = serde_json::from_str(&ok_stdout(&d.kvtier(&["status", "--json"]))).unwrap();
    let usage: Vec<(&str, u64, u64, u64)> = (json["namespace_usage"].as_array().unwrap().iter())
        .map(|u| {
            let n = |k: &str| u[k].as_u64().unwrap();
            (u["model"].as_str().unwrap(), n("block_bytes"), n("host_blocks"), n("disk_blocks"))
        })
        .collect();
    assert_eq!(usage, [("kvtier-cli-test", 8192, 10, 0), ("other", 16384, 4, 0)]);
    let status = ok_stdout(&d.kvtier(&["status"]));
    assert!(status.contains("namespace other ["), "{status}");

    // Lookups (and the `get` above: a load no Lookup announced) are counted per namespace too,
    // in status and in labelled metrics.
    ok_stdout(&d.kvtier(&["lookup", "--count", "12", "--block-bytes", "8192"]));
    let json: serde_json::Value = serde_json::from_str(&ok_stdout(&d.kvtier(&["status", "--json"]))).unwrap();
    let ours = &json["namespace_usage"][0];
    assert_eq!((ours["hit_blocks"].as_u64(), ours["miss_blocks"].as_u64()), (Some(20), Some(4)), "{ours}");
    assert_eq!(json["namespace_usage"][1]["hit_blocks"].as_u64(), Some(0));
    let labels = format!("model=\"kvtier-cli-test\",namespace=\"{}\"", ours["id_prefix"].as_str().unwrap());
    let m = d.http_get("/metrics");
    for line in [
        format!("kvtier_namespace_hit_blocks_total{{{labels}}} 20\n"),
        format!("kvtier_namespace_miss_blocks_total{{{labels}}} 4\n"),
        format!("kvtier_namespace_blocks{{{labels},tier=\"host\"}} 10\n"),
    ] {
        assert!(m.contains(&line), "missing {line:?} in\n{m}");
    }
    assert!(ok_stdout(&d.kvtier(&["status"])).contains("hit rate 0.833 (20 of 24 blocks, 0 from disk)"));
}

/// The next `kvtier top --json` line.
fn top_line(lines: &mut Lines<BufReader<ChildStdout>>) -> serde_json::Value {
    serde_json::from_str(&lines.next().expect("kvtier top ended").unwrap()).unwrap()
}

/// Sums `field` of the deltas of `top`'s lines until it reaches `want` (a refresh every 0.1 s;
/// the last of them may also count whatever else happened since).
fn top_deltas_reach(lines: &mut Lines<BufReader<ChildStdout>>, fields: &[&str], want: &[u64]) -> Vec<u64> {
    let mut sums = vec![0; fields.len()];
    for refreshes in 0.. {
        if sums.iter().zip(want).all(|(s, w)| s >= w) {
            break;
        }
        assert!(refreshes < 600, "60 s of refreshes and only {sums:?} of {want:?}");
        let v = top_line(lines);
        for (sum, f) in sums.iter_mut().zip(fields) {
            *sum += v["delta"][f].as_u64().expect("a delta");
        }
    }
    sums
}

#[test]
fn top_reports_each_intervals_traffic_and_follows_a_restarted_daemon() {
    let mut d = Daemon::start(&[]);
    let mut top = Command::new(bin("kvtier"))
        // Bounded: if it ever stops printing, the test ends when it does (5 minutes at most).
        .args(["top", "--json", "--interval", "0.1", "--count", "3000"])
        .env("KVTIER_SOCKET", &d.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(top.stdout.take().unwrap()).lines();
    let first = top_line(&mut lines);
    assert!(first["delta"].is_null(), "the first refresh has no interval: {first}");
    assert_eq!(first["tiers"][0]["tier"], "TIER_HOST");

    // 16 blocks of 64 KiB saved, then loaded: exactly that, in the intervals that follow.
    ok_stdout(&d.kvtier(&["put", "--count", "16"]));
    ok_stdout(&d.kvtier(&["get", "--count", "16"]));
    let sums =
        top_deltas_reach(&mut lines, &["kvtier_saved_bytes_total", "kvtier_loaded_bytes_total"], &[16 << 16, 16 << 16]);
    assert_eq!(sums, [16 << 16, 16 << 16]);

    // The daemon restarts: top reconnects, starts a new baseline, and counts from there.
    d.restart();
    while !top_line(&mut lines)["delta"].is_null() {}
    ok_stdout(&d.kvtier(&["put", "--count", "8", "--seed", "2"]));
    let sums = top_deltas_reach(&mut lines, &["kvtier_saved_bytes_total"], &[8 << 16]);
    assert_eq!(sums, [8 << 16]);
    let _ = top.kill();
    let _ = top.wait();
}

#[test]
fn second_daemon_on_the_same_socket_is_refused() {
    let d = Daemon::start(&[]);
    let out = kvtierd(
        &["--socket", d.socket.to_str().unwrap(), "--allow-unlocked", "--pool-bytes", "16 MiB", "--metrics-listen", ""],
        &[],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another daemon"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn shared_trace() -> PathBuf {
    if let Some(p) = std::env::var_os("KVTIER_TRACE") {
        return p.into();
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/traces/synthetic_trace.jsonl");
    assert!(p.exists(), "{} not found (set KVTIER_TRACE)", p.display());
    p
}

#[test]
fn sim_prints_json_lines_for_every_capacity_and_policy() {
    let out = Command::new(bin("kvtier")).args(["sim", "--json"]).arg(shared_trace()).output().unwrap();
    let text = ok_stdout(&out);
    let rows: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 6 * 3, "{text}");
    let rate = |pct: f64, policy: &str| {
        rows.iter()
            .find(|r| r["capacity_pct"] == pct && r["policy"] == policy)
            .and_then(|r| r["hit_rate"].as_f64())
            .unwrap_or_else(|| panic!("no row for {pct} {policy}"))
    };
    // The reference figures of the issue for the shared trace at 10 %.
    assert!((rate(10.0, "lru") - 0.26).abs() < 0.01, "lru {}", rate(10.0, "lru"));
    assert!((rate(10.0, "belady") - 0.50).abs() < 0.01, "belady {}", rate(10.0, "belady"));
    for pct in [1.0, 2.0, 5.0, 10.0, 20.0, 50.0] {
        let opt = rate(pct, "belady");
        assert!(
            rate(pct, "lru") <= opt + 1e-9 && rate(pct, "prefix-lfu") <= opt + 1e-9,
            "belady is the bound at {pct}%"
        );
    }
}

#[test]
fn gpu_backends_without_their_driver_refuse_to_start_with_a_clear_message() {
    if kvtier_daemon::device::cuda::driver_present() || kvtier_daemon::device::rocm::driver_present() {
        eprintln!("a GPU driver is present: the refusal cannot be seen on this machine");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    for (backend, missing) in [("cuda", "libcuda.so.1"), ("rocm", "libamdhip64.so")] {
        let out = kvtierd(
            &[
                "--socket",
                socket.to_str().unwrap(),
                "--allow-unlocked",
                "--pool-bytes",
                "16 MiB",
                "--metrics-listen",
                "",
                "--grpc-listen",
                "",
                "--grpc-socket",
                "",
                "--device-backend",
                backend,
            ],
            &[],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{backend} started without its driver");
        assert!(err.contains(missing) && err.contains("\"host\""), "{backend}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_backend_falls_back_to_daemon_side_host_copies() {
    for args in [&["--device-backend", "auto"][..], &[]] {
        let d = Daemon::start(args);
        let c = d.client("device-probe").await;
        let gpu = kvtier_daemon::device::cuda::driver_present() || kvtier_daemon::device::rocm::driver_present();
        let hello = c.hello();
        assert_eq!(hello.device_backend == "cma", !gpu, "auto is the default: {args:?} {hello:?}");
        assert_eq!(hello.device_dma, !gpu, "GPU engine-memory DMA is not offered yet; cma copies host memory");
    }
}

fn clients_json(d: &Daemon) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(&ok_stdout(&d.kvtier(&["clients", "--json"]))).unwrap();
    v["clients"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_lists_each_connection_with_what_it_registered_and_holds() {
    let d = Daemon::start_with_metrics(&[], true);
    let mut engine = d.client("engine-a").await;
    let ns = engine.register(kvtier_tests::namespace("model-a", 4096)).await.unwrap();
    engine.reserve(&ns, &kvtier_client::testdata::chained_hashes(1, 3), None).await.unwrap();
    let listed = clients_json(&d);
    assert_eq!(listed.len(), 2, "the engine and the CLI itself: {listed:?}");
    let e = listed.iter().find(|c| c["name"] == "engine-a").unwrap();
    assert_eq!(e["pid"].as_u64(), Some(u64::from(std::process::id())), "{e}");
    assert_eq!((e["uid"].as_u64(), e["held_blocks"].as_u64(), e["requests"].as_u64()), (Some(0), Some(3), Some(3)));
    assert_eq!((e["namespaces"][0]["model"].as_str(), e["kv_caches"].as_u64()), (Some("model-a"), Some(0)));
    let cli = listed.iter().find(|c| c["name"] == "kvtier-clients").unwrap();
    assert_eq!(cli["requests"].as_u64(), Some(2), "Hello and Clients: {cli}");
    assert!(cli["id"].as_u64() > e["id"].as_u64(), "oldest first");

    let table = ok_stdout(&d.kvtier(&["clients"]));
    assert!(table.lines().any(|l| l.contains("engine-a") && l.contains("model-a/")), "{table}");
    drop(engine);
    kvtier_tests::eventually("a closed connection leaves the list", || {
        clients_json(&d).iter().all(|c| c["name"] != "engine-a")
    });
    assert_eq!(d.metric("kvtier_host_reserved_blocks"), 0.0, "its reservation went with it");
}

#[test]
fn the_log_filter_changes_while_the_daemon_runs() {
    let d = Daemon::start(&[]);
    let initial = ok_stdout(&d.kvtier(&["log-filter"])).trim().to_string();
    assert!(!initial.is_empty());
    let connected = || d.log().matches("client connected").count();
    let out = ok_stdout(&d.kvtier(&["log-filter", "warn"]));
    assert_eq!(out.trim(), format!("log filter warn (was {initial})"));
    assert!(d.log().contains("log filter changed"), "the change itself is logged at warn");
    let quiet = connected();
    ok_stdout(&d.kvtier(&["status"]));
    assert_eq!(connected(), quiet, "debug lines are off");
    let set = ok_stdout(&d.kvtier(&["log-filter", "info,kvtier_daemon::server=debug"]));
    // The daemon prints filters in its own order of directives.
    assert_eq!(set.trim(), "log filter kvtier_daemon::server=debug,info (was warn)");
    ok_stdout(&d.kvtier(&["status"]));
    kvtier_tests::eventually("debug lines of the server module are back", || connected() > quiet);
    let bad = d.kvtier(&["log-filter", "kvtier_daemon=loud"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("bad log filter"), "{bad:?}");
    assert_eq!(ok_stdout(&d.kvtier(&["log-filter"])).trim(), "kvtier_daemon::server=debug,info", "unchanged");
}

#[test]
fn discard_by_tenant_salt_removes_every_model_of_that_tenant_and_nothing_else() {
    let d = Daemon::start(&[]);
    let prompt = |model: &str, salt: &str| ["--model", model, "--cache-salt", salt, "--count", "4"].map(String::from);
    let run = |verb: &str, model: &str, salt: &str| {
        let args: Vec<String> = std::iter::once(verb.to_string()).chain(prompt(model, salt)).collect();
        ok_stdout(&d.kvtier(&args.iter().map(String::as_str).collect::<Vec<_>>()))
    };
    for (model, salt) in [("a", "t1"), ("b", "t1"), ("a", "t2")] {
        run("put", model, salt);
    }
    // A dry run names what would go and removes nothing.
    let dry = ok_stdout(&d.kvtier(&["discard", "--cache-salt", "t1", "--dry-run", "--json"]));
    let dry: serde_json::Value = serde_json::from_str(&dry).unwrap();
    assert_eq!((dry["namespaces"].as_u64(), dry["host_blocks"].as_u64()), (Some(2), Some(8)), "{dry}");
    let models: Vec<&str> = dry["matched"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
    assert!(models.len() == 2 && models[0].starts_with("a/") && models[1].starts_with("b/"), "{dry}");
    assert!(run("lookup", "a", "t1").contains("matched 4 of 4"), "a dry run removes nothing");
    let out = ok_stdout(&d.kvtier(&["discard", "--cache-salt", "t1", "--json"]));
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((r["namespaces"].as_u64(), r["host_blocks"].as_u64()), (Some(2), Some(8)), "{r}");
    assert!(run("lookup", "a", "t1").contains("matched 0 of 4"));
    assert!(run("lookup", "b", "t1").contains("matched 0 of 4"));
    assert!(run("lookup", "a", "t2").contains("matched 4 of 4"), "the other tenant keeps its blocks");
    // Combined criteria match together: model a of tenant t2 only, not model a of another tenant.
    let none = d.kvtier(&["discard", "--model", "a", "--cache-salt", "t3"]);
    assert!(!none.status.success() && String::from_utf8_lossy(&none.stderr).contains("no namespace matches"));
    run("put", "a", "t3");
    assert!(ok_stdout(&d.kvtier(&["discard", "--model", "a", "--cache-salt", "t2"])).contains("discarded 4 blocks"));
    assert!(run("lookup", "a", "t2").contains("matched 0 of 4"));
    assert!(run("lookup", "a", "t3").contains("matched 4 of 4"));
    assert!(!d.log().contains("t1\""), "salts stay out of the log");
}

#[test]
fn kvtier_bench_never_evicts_other_clients_blocks() {
    // 32 MiB pool: an engine's 16 MiB, and a bench moving 8 MiB a round for 5 rounds.
    let d = Daemon::start(&["--allowed-uid", "4242"]);
    ok_stdout(&d.kvtier(&["put", "--count", "256", "--model", "engine"]));
    let bench = ["bench", "--bytes", "8388608", "--rounds", "5", "--json"];
    // An admin's bench removes each round's blocks: it fits, and leaves nothing behind.
    let r: serde_json::Value = serde_json::from_str(&ok_stdout(&d.kvtier(&bench))).unwrap();
    assert!(r["save_bps"].as_f64().unwrap() > 0.0, "{r}");
    let got = ok_stdout(&d.kvtier(&["lookup", "--count", "256", "--model", "engine"]));
    assert!(got.contains("matched 256"), "the engine's blocks are all still held: {got}");
    let json: serde_json::Value = serde_json::from_str(&ok_stdout(&d.kvtier(&["status", "--json"]))).unwrap();
    let bench_blocks: u64 = (json["namespace_usage"].as_array().unwrap().iter())
        .filter(|u| u["model"] == "kvtier-bench")
        .map(|u| u["host_blocks"].as_u64().unwrap())
        .sum();
    assert_eq!(bench_blocks, 0, "{json}");
    // Anyone else's bench must fit in the free room all rounds together: refused, nothing evicted.
    let (ok, text) = d.kvtier_as(4242, &bench);
    assert!(!ok && text.contains("would evict other clients' blocks"), "{text}");
    let (ok, text) = d.kvtier_as(4242, &["bench", "--bytes", "1048576", "--rounds", "2", "--json"]);
    assert!(ok, "a bench that fits runs: {text}");
    assert!(ok_stdout(&d.kvtier(&["lookup", "--count", "256", "--model", "engine"])).contains("matched 256"));
}

#[test]
fn the_readmes_sim_examples_run_on_the_trace_shipped_with_the_repository() {
    let readme = std::fs::read_to_string(kvtier_tests::repo().join("README.md")).unwrap();
    let examples: Vec<Vec<&str>> = (readme.lines())
        .filter(|l| l.starts_with("kvtier sim "))
        .map(|l| l.split('#').next().unwrap().split_whitespace().skip(1).collect())
        .collect();
    assert!(examples.len() >= 3, "README lost its sim examples");
    for args in examples {
        let out = Command::new(bin("kvtier")).args(&args).current_dir(kvtier_tests::repo()).output().unwrap();
        let text = ok_stdout(&out);
        assert!(text.contains("belady") || text.contains("cache-aware"), "kvtier {args:?}:\n{text}");
    }
}
