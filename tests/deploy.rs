//! The deployment (`deploy/`) against the real binaries: the ConfigMap's configuration starts a
//! real kvtierd, the router runs with its Deployment's arguments, every port, path and flag the
//! manifests name agrees with that configuration and the binaries, the Grafana dashboard's
//! queries name metrics and labels the daemon and the router export, and the image installs
//! every library the binaries link.

use kvtier_daemon::config::Config;
use kvtier_daemon::device::BackendKind;
use kvtier_tests::{bin, eventually, http_get, metric_families, ok_stdout, repo, Daemon, RouterProc};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use yaml_rust2::{Yaml, YamlLoader};

/// The documents of `deploy/kubernetes/base/<file>`, or of `deploy/kubernetes/<file>` for the
/// examples.
fn manifests(file: &str) -> Vec<Yaml> {
    let dir = if file.starts_with("examples/") { "deploy/kubernetes" } else { "deploy/kubernetes/base" };
    let path = repo().join(dir).join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `kubectl`: `$KVTIER_KUBECTL` (`scripts/k8s-tools` installs one where the machine has none),
/// else the one on the PATH.
fn kubectl() -> PathBuf {
    std::env::var_os("KVTIER_KUBECTL").map_or_else(|| PathBuf::from("kubectl"), PathBuf::from)
}

/// The kustomizations an operator applies: the base and every overlay.
fn kustomizations() -> Vec<PathBuf> {
    let overlays = repo().join("deploy/kubernetes/overlays");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&overlays).unwrap().map(|e| e.unwrap().path()).collect();
    dirs.sort();
    assert!(dirs.len() >= 2, "overlays in {}", overlays.display());
    [vec![repo().join("deploy/kubernetes/base")], dirs].concat()
}

/// What `kubectl kustomize dir` renders, as text.
fn render_text(dir: &Path) -> String {
    let out = Command::new(kubectl())
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/k8s-tools, or set KVTIER_KUBECTL)", kubectl().display()));
    assert!(out.status.success(), "kubectl kustomize {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The objects `kubectl kustomize dir` renders.
fn rendered(dir: &Path) -> Vec<Yaml> {
    YamlLoader::load_from_str(&render_text(dir)).unwrap()
}

/// The object of `kind` named `name` among `docs`.
fn object<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The items of a YAML list (none if it is not one).
fn items(y: &Yaml) -> &[Yaml] {
    y.as_vec().map(Vec::as_slice).unwrap_or_default()
}

/// The strings of a YAML list.
fn strings(y: &Yaml) -> Vec<String> {
    items(y).iter().map(|s| s.as_str().expect("a string").to_string()).collect()
}

/// The first container of a workload's pod template.
fn container(workload: &Yaml) -> &Yaml {
    &workload["spec"]["template"]["spec"]["containers"][0]
}

/// The number (`field`) of the port named `name` in a list of ports.
fn named_port(ports: &Yaml, name: &str, field: &str) -> i64 {
    items(ports)
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p[field].as_i64())
        .unwrap_or_else(|| panic!("no {field} named {name}"))
}

/// A container's port by name.
fn container_port(c: &Yaml, name: &str) -> i64 {
    named_port(&c["ports"], name, "containerPort")
}

/// A Service's port by name.
fn service_port(svc: &Yaml, name: &str) -> i64 {
    named_port(&svc["spec"]["ports"], name, "port")
}

/// The port of `host:port`.
fn port_of(addr: &str) -> i64 {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or_else(|| panic!("no port in {addr}"))
}

/// The value after `flag` in `args`.
fn flag_value<'a>(args: &'a [String], flag: &str) -> &'a str {
    let i = args.iter().position(|a| a == flag).unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    &args[i + 1]
}

/// Bytes of a Kubernetes quantity such as "66Gi".
fn quantity_bytes(q: &str) -> u64 {
    let units = [("Ki", 1u64 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30), ("Ti", 1 << 40)];
    let (digits, unit) = units.iter().find_map(|&(u, n)| q.strip_suffix(u).map(|d| (d, n))).unwrap_or((q, 1));
    digits.parse::<u64>().unwrap_or_else(|_| panic!("quantity {q}")) * unit
}

/// The daemon's configuration as the ConfigMap holds it, written to `dir`, parsed by the daemon's
/// own loader (unknown keys refused).
fn config_map_config(docs: &[Yaml], dir: &Path) -> (PathBuf, Config) {
    let cm = object(docs, "ConfigMap", "kvtierd-config");
    let path = dir.join("kvtierd.toml");
    std::fs::write(&path, cm["data"]["kvtierd.toml"].as_str().expect("kvtierd.toml in the ConfigMap")).unwrap();
    let config = Config::load(&path).unwrap_or_else(|e| panic!("the ConfigMap's kvtierd.toml: {e:#}"));
    (path, config)
}

/// The volume mounted nearest above `path` (the longest mount path holding it): (its volume,
/// its mount path).
fn mount_holding<'a>(pod: &'a Yaml, c: &'a Yaml, path: &Path) -> (&'a Yaml, String) {
    let mount = items(&c["volumeMounts"])
        .iter()
        .filter(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
        .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
        .unwrap_or_else(|| panic!("nothing mounted over {}", path.display()));
    let name = mount["name"].as_str().unwrap();
    let volume = items(&pod["volumes"]).iter().find(|v| v["name"].as_str() == Some(name)).expect("the volume");
    (volume, mount["mountPath"].as_str().unwrap().to_string())
}

#[test]
fn the_base_lists_every_manifest_and_every_kustomization_renders_well_formed_objects() {
    let dir = repo().join("deploy/kubernetes/base");
    let kustomization = &manifests("kustomization.yaml")[0];
    let listed: BTreeSet<String> = strings(&kustomization["resources"]).into_iter().collect();
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "kustomization.yaml resources vs the manifests in deploy/kubernetes/base");
    for dir in kustomizations() {
        well_formed(&rendered(&dir));
    }
}

/// Every object has its apiVersion and namespace, workloads' selectors match their pods, priority
/// classes exist, and Services select a workload serving their ports.
fn well_formed(docs: &[Yaml]) {
    let workloads: Vec<&Yaml> =
        docs.iter().filter(|d| matches!(d["kind"].as_str(), Some("DaemonSet" | "Deployment"))).collect();
    for d in docs {
        let (kind, name) = (d["kind"].as_str().unwrap(), d["metadata"]["name"].as_str().unwrap());
        assert!(d["apiVersion"].as_str().is_some(), "{kind} {name}: apiVersion");
        if kind == "PriorityClass" {
            let policy = d["preemptionPolicy"].as_str();
            assert_eq!(policy, Some("Never"), "{name}: a daemon never evicts running inference pods to be placed");
        }
        if !matches!(kind, "Namespace" | "PriorityClass") {
            assert_eq!(d["metadata"]["namespace"].as_str(), Some("kvtier"), "{kind} {name}: namespace");
        }
        if let Some(class) = d["spec"]["template"]["spec"]["priorityClassName"].as_str() {
            let defined = docs
                .iter()
                .any(|p| p["kind"].as_str() == Some("PriorityClass") && p["metadata"]["name"].as_str() == Some(class));
            assert!(defined, "{kind} {name}: priority class {class} is not in the kustomization");
        }
        if matches!(kind, "DaemonSet" | "Deployment") {
            let labels = d["spec"]["template"]["metadata"]["labels"].as_hash().expect("template labels");
            for (k, v) in d["spec"]["selector"]["matchLabels"].as_hash().expect("selector") {
                assert_eq!(labels.get(k), Some(v), "{kind} {name}: its selector matches its pods");
            }
        }
        if kind == "Service" {
            // Some workload's pods carry the selector's labels and serve every port.
            let selector = d["spec"]["selector"].as_hash().expect("selector");
            let w = workloads
                .iter()
                .find(|w| {
                    let labels = w["spec"]["template"]["metadata"]["labels"].as_hash().unwrap();
                    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                })
                .unwrap_or_else(|| panic!("Service {name} selects no workload"));
            for p in items(&d["spec"]["ports"]) {
                let port = p["port"].as_i64().unwrap();
                let served = items(&container(w)["ports"]).iter().any(|c| c["containerPort"].as_i64() == Some(port));
                assert!(served, "Service {name} port {port}: no container port");
            }
        }
    }
}

/// `kubernetes-validate`: `$KVTIER_K8S_VALIDATE` (`scripts/k8s-tools` installs it), else the one
/// on the PATH.
fn validator() -> PathBuf {
    std::env::var_os("KVTIER_K8S_VALIDATE").map_or_else(|| PathBuf::from("kubernetes-validate"), PathBuf::from)
}

#[test]
fn every_kustomization_validates_against_the_kubernetes_schemas_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let validate = |file: &Path| {
        let out = Command::new(validator()).arg("--strict").arg("--quiet").arg(file).output().unwrap_or_else(|e| {
            panic!("{}: {e} (run scripts/k8s-tools, or set KVTIER_K8S_VALIDATE)", validator().display())
        });
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    for dir in kustomizations() {
        let file = tmp.path().join(format!("{}.yaml", dir.file_name().unwrap().to_string_lossy()));
        std::fs::write(&file, render_text(&dir)).unwrap();
        let (ok, text) = validate(&file);
        assert!(ok, "{}: {text}", dir.display());
    }
    // The validator refuses what it should: a field the schema does not have.
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(&bad, "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\nspec:\n  nonsense: 1\n").unwrap();
    assert!(!validate(&bad).0, "an invalid object passed validation");
}

#[test]
fn the_pod_monitor_scrapes_every_workload_where_its_annotations_point() {
    let monitor = &manifests("examples/podmonitor.yaml")[0];
    let selector = monitor["spec"]["selector"]["matchLabels"].as_hash().unwrap();
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    for (file, kind, name) in [("kvtierd.yaml", "DaemonSet", "kvtierd"), ("router.yaml", "Deployment", "kvtier-router")]
    {
        let docs = manifests(file);
        let template = &object(&docs, kind, name)["spec"]["template"];
        let labels = template["metadata"]["labels"].as_hash().unwrap();
        assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)), "the PodMonitor selects {name}");
        let port = container_port(container(object(&docs, kind, name)), endpoint["port"].as_str().unwrap());
        let annotations = &template["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/port"].as_str(), Some(port.to_string().as_str()), "{name}");
        assert_eq!(annotations["prometheus.io/path"].as_str(), endpoint["path"].as_str(), "{name}");
    }
}

/// The settings a DaemonSet's container takes from its `envFrom` ConfigMap (an overlay's
/// settings.env), as (name, value); none where the ConfigMap is absent (optional in the base).
fn settings_env(docs: &[Yaml], c: &Yaml) -> Vec<(String, String)> {
    let Some(name) = items(&c["envFrom"]).iter().find_map(|e| e["configMapRef"]["name"].as_str()) else {
        return Vec::new();
    };
    let cm =
        docs.iter().find(|d| d["kind"].as_str() == Some("ConfigMap") && d["metadata"]["name"].as_str() == Some(name));
    let data = cm.and_then(|cm| cm["data"].as_hash()).map(|h| h.iter().collect::<Vec<_>>()).unwrap_or_default();
    data.into_iter().map(|(k, v)| (k.as_str().unwrap().to_string(), v.as_str().unwrap().to_string())).collect()
}

#[test]
fn every_daemon_set_matches_its_configuration_and_the_engines() {
    for dir in kustomizations() {
        check_daemon_set(&dir);
    }
}

/// The DaemonSet `dir` renders against the configuration its daemon would run with (the
/// ConfigMap's file and the overlay's settings, as the real kvtierd reads them), the router and
/// the engine example.
fn check_daemon_set(dir: &Path) {
    let at = dir.strip_prefix(repo()).unwrap().display().to_string();
    let docs = rendered(dir);
    let tmp = tempfile::tempdir().unwrap();
    let (path, _) = config_map_config(&docs, tmp.path());
    let ds = object(&docs, "DaemonSet", "kvtierd");
    let (pod, c) = (&ds["spec"]["template"]["spec"], container(ds));

    // The real daemon accepts the file and the settings as the DaemonSet passes them; what it
    // prints is the configuration it would run with.
    let args = strings(&c["args"]);
    let mounted = Path::new(flag_value(&args, "--config"));
    let (volume, _) = mount_holding(pod, c, mounted);
    assert_eq!(volume["configMap"]["name"].as_str(), Some("kvtierd-config"), "{at}");
    assert_eq!(mounted.file_name().unwrap(), "kvtierd.toml");
    let mut local = args.clone();
    local[1 + args.iter().position(|a| a == "--config").unwrap()] = path.display().to_string();
    let settings = settings_env(&docs, c);
    let mut daemon = Command::new(bin("kvtierd"));
    daemon.args(&local).arg("--print-config").env_clear().envs(settings.iter().map(|(k, v)| (k, v)));
    let config = Config::from_toml(&ok_stdout(&daemon.output().unwrap())).unwrap();
    let setting = |name: &str| settings.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    if at.contains("overlays") {
        for name in ["KVTIER_POOL_BYTES", "POD_MEMORY", "SPILL_HOST_PATH"] {
            assert!(setting(name).is_some(), "{at}: settings.env sets {name}");
        }
        let pool: bytesize::ByteSize = setting("KVTIER_POOL_BYTES").unwrap().parse().unwrap();
        assert_eq!(config.pool.bytes, pool, "{at}: the daemon runs with the overlay's pool size");
    }

    // Sockets on the host directory engines mount; spill directories on host paths.
    let (run, run_mount) = mount_holding(pod, c, &config.server.socket);
    let run_host = run["hostPath"]["path"].as_str().expect("the socket directory is a hostPath");
    assert_eq!(run_host, run_mount, "engines see the socket where the daemon's config names it");
    mount_holding(pod, c, &config.grpc.socket);
    let env = c["env"].as_vec().expect("the container sets its environment");
    let cli_socket = env.iter().find(|e| e["name"].as_str() == Some("KVTIER_SOCKET")).map(|e| &e["value"]);
    let cli_socket = cli_socket.and_then(|v| v.as_str()).map(PathBuf::from);
    assert_eq!(cli_socket.as_ref(), Some(&config.server.socket), "`kubectl exec ... kvtier status` finds the daemon");
    assert!(!config.disk.dirs.is_empty(), "the DaemonSet runs a disk tier");
    for d in &config.disk.dirs {
        let host = &mount_holding(pod, c, d).0["hostPath"];
        assert!(host["path"].as_str().is_some(), "{}: a host path", d.display());
        if let Some(spill) = setting("SPILL_HOST_PATH") {
            assert_eq!(host["path"].as_str(), Some(spill), "{at}: the spill directory is the overlay's");
        }
        assert_eq!(
            host["type"].as_str(),
            Some("Directory"),
            "{}: must exist, never created on the root disk",
            d.display()
        );
    }

    // Secure by default: the TCP port serves mutual TLS only, from the Secret, and so does the
    // router dialing it.
    assert!(config.grpc.tls.enabled() && !config.grpc.insecure, "the feed's TCP port needs mutual TLS");
    for file in [&config.grpc.tls.cert, &config.grpc.tls.key, &config.grpc.tls.ca] {
        let (volume, _) = mount_holding(pod, c, file);
        assert_eq!(volume["secret"]["secretName"].as_str(), Some("kvtier-tls"), "{}", file.display());
    }
    let router_deployment = object(&docs, "Deployment", "kvtier-router");
    let rargs = strings(&container(router_deployment)["args"]);
    for (flag, file) in [("--tls-cert", "tls.crt"), ("--tls-key", "tls.key"), ("--tls-ca", "ca.crt")] {
        let path = Path::new(flag_value(&rargs, flag));
        assert_eq!(path.file_name().unwrap(), file);
        let rpod = &router_deployment["spec"]["template"]["spec"];
        let (volume, _) = mount_holding(rpod, container(router_deployment), path);
        assert_eq!(volume["secret"]["secretName"].as_str(), Some("kvtier-tls"), "router {flag}");
    }
    assert!(config.server.trusted_uids.is_empty(), "no engine maps the pool by default");

    // Ports: configuration = container ports = probes = annotations = the Service.
    let svc = object(&docs, "Service", "kvtierd");
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    let metrics = port_of(&config.metrics.listen);
    assert_eq!(container_port(c, "metrics"), metrics);
    assert_eq!(c["livenessProbe"]["httpGet"]["port"].as_i64(), Some(metrics));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    assert_eq!(c["startupProbe"]["httpGet"]["port"].as_i64(), Some(metrics));
    assert_eq!(annotations["prometheus.io/port"].as_str(), Some(metrics.to_string().as_str()));
    assert_eq!(service_port(svc, "metrics"), metrics);
    let grpc = port_of(&config.grpc.listen);
    assert_eq!(container_port(c, "grpc"), grpc);
    assert_eq!(c["readinessProbe"]["httpGet"]["port"].as_i64(), Some(metrics), "readiness says what is off");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
    assert_eq!(service_port(svc, "grpc"), grpc);
    assert_eq!(svc["spec"]["publishNotReadyAddresses"].as_bool(), Some(true), "routers follow degraded daemons");
    let dns = flag_value(&strings(&container(router_deployment)["args"]), "--dns").to_string();
    assert_eq!(dns, format!("kvtierd.kvtier.svc.cluster.local:{grpc}"), "the router resolves the daemons' Service");
    assert!(config.transfer.enabled, "the DaemonSet ships P/D blocks");
    assert!(config.transfer.listen_port > 0, "lane ports must be fixed to be opened between nodes");
    for lane in 0..config.transfer.lanes {
        assert_eq!(
            container_port(c, &format!("ucx-lane-{lane}")),
            (config.transfer.listen_port as usize + lane) as i64
        );
    }

    // What the configuration needs of the pod.
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true), "engines name the node's address as transfer source");
    let caps = strings(&c["securityContext"]["capabilities"]["add"]);
    assert!(caps.contains(&"IPC_LOCK".to_string()), "mlock of the pool");
    if matches!(config.device.backend, BackendKind::Auto | BackendKind::Cma) {
        assert_eq!(pod["hostPID"].as_bool(), Some(true), "the daemon's copies need engines' pids");
        assert!(caps.contains(&"SYS_PTRACE".to_string()), "process_vm_readv of another uid's engine");
    }
    assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap() as u64 > config.disk.shutdown_flush_secs);
    let limits = &c["resources"]["limits"];
    let pool = config.pool.bytes.as_u64();
    if config.pool.hugetlb {
        assert!(quantity_bytes(limits["hugepages-2Mi"].as_str().expect("hugepages-2Mi limit")) >= pool);
    } else {
        let memory = quantity_bytes(limits["memory"].as_str().expect("a memory limit"));
        assert!(memory >= pool + (1 << 30), "{at}: the pool ({pool} B) is charged to the pod: limit {memory} B");
    }
    assert_eq!(c["resources"]["requests"], *limits, "Guaranteed QoS: the pool is locked memory");

    // The engine example connects to that socket and names this daemon as its transfer source.
    let engine = &manifests("examples/vllm.yaml")[0];
    let (epod, ec) = (&engine["spec"]["template"]["spec"], container(engine));
    let (evol, emount) = mount_holding(epod, ec, &config.server.socket);
    assert_eq!(evol["hostPath"]["path"].as_str(), Some(run_host));
    assert_eq!(emount, run_mount);
    let eargs = strings(&ec["args"]);
    let kv: serde_json::Value = serde_json::from_str(flag_value(&eargs, "--kv-transfer-config")).unwrap();
    let extra = &kv["kv_connector_extra_config"];
    assert_eq!(extra["socket"].as_str().map(PathBuf::from), Some(config.server.socket.clone()));
    assert_eq!(extra["transfer_source"].as_str(), Some(format!("$(HOST_IP):{grpc}").as_str()));
    let module = kv["kv_connector_module_path"].as_str().unwrap().replace('.', "/");
    let (file, package) =
        (repo().join("client/python").join(format!("{module}.py")), repo().join("client/python").join(&module));
    let source =
        std::fs::read_to_string(file).or_else(|_| std::fs::read_to_string(package.join("__init__.py"))).unwrap();
    assert!(source.contains(&format!("class {}", kv["kv_connector"].as_str().unwrap())));
    let host_ip = items(&ec["env"]).iter().find(|e| e["name"].as_str() == Some("HOST_IP")).expect("HOST_IP");
    assert_eq!(host_ip["valueFrom"]["fieldRef"]["fieldPath"].as_str(), Some("status.hostIP"));
}

/// Metric names and grouping labels of a PromQL expression and its legend.
fn query_names(expr: &str, legend: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let ident = |s: &str| s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
    let metrics = expr.match_indices("kvtier_").map(|(i, _)| ident(&expr[i..])).collect();
    let mut labels = BTreeSet::new();
    for (i, _) in expr.match_indices("by (") {
        let inside = &expr[i + 4..i + 4 + expr[i + 4..].find(')').unwrap()];
        labels.extend(inside.split(',').map(|l| l.trim().to_string()));
    }
    for part in legend.split("{{").skip(1) {
        labels.insert(part.split("}}").next().unwrap().trim().to_string());
    }
    for implicit in ["le", "instance", "job"] {
        labels.remove(implicit);
    }
    (metrics, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_daemon_and_router_serve_and_export_every_metric_the_dashboard_queries() {
    // kvtierd with the ConfigMap's configuration; what is the node's here is the test's: pool
    // size, spill directory, sockets and ports (flags win over the file).
    let tmp = tempfile::tempdir().unwrap();
    let (_, mut config) = config_map_config(&manifests("kvtierd.yaml"), tmp.path());
    config.transfer.listen_port = 0;
    // The Secret's files: a test CA's certificate for "kvtierd", as the secret volume holds them.
    let pki = kvtier_tests::Pki::new(&[("ca", "node")]);
    let secret = tmp.path().join("tls");
    std::fs::create_dir(&secret).unwrap();
    pki.install(&secret, "ca", "node");
    let in_secret = |p: &Path| secret.join(p.file_name().unwrap());
    let tls = &mut config.grpc.tls;
    (tls.cert, tls.key, tls.ca) = (in_secret(&tls.cert), in_secret(&tls.key), in_secret(&tls.ca));
    let path = tmp.path().join("local.toml");
    std::fs::write(&path, config.to_toml()).unwrap();
    let spill = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap(); // O_DIRECT: not tmpfs
    let d = Daemon::start_with_metrics(
        &[
            "--config",
            path.to_str().unwrap(),
            "--pool-bytes",
            "64 MiB",
            "--disk-dir",
            spill.path().to_str().unwrap(),
            "--disk-bytes-per-dir",
            "64 MiB",
        ],
        true,
    );
    assert_eq!(d.http_get("/healthz").trim(), "ok");
    ok_stdout(&d.kvtier(&["put", "--count", "8"]));
    ok_stdout(&d.kvtier(&["get", "--count", "8"]));
    // A malformed frame: one error counted, by code.
    let mut bad = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    bad.write_all(&[4, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).unwrap();
    let _ = bad.read(&mut [0u8; 256]);
    eventually("the error counted", || d.http_get("/metrics").contains("kvtier_errors_total{"));

    // The router with the Deployment's arguments, following that daemon.
    let deployment = object(&manifests("router.yaml"), "Deployment", "kvtier-router").clone();
    let c = container(&deployment);
    assert_eq!(strings(&c["command"]), ["kvtier"]);
    let args = strings(&c["args"]);
    assert_eq!(args[0], "router");
    assert_eq!(container_port(c, "grpc"), port_of(flag_value(&args, "--listen")));
    assert_eq!(container_port(c, "metrics"), port_of(flag_value(&args, "--metrics-listen")));
    assert_eq!(c["livenessProbe"]["httpGet"]["port"].as_i64(), Some(container_port(c, "metrics")));
    assert_eq!(c["readinessProbe"]["grpc"]["port"].as_i64(), Some(container_port(c, "grpc")));
    // Its other flags as they are, but for where the daemons are: this one, through DNS too.
    let mut rest: Vec<String> = Vec::new();
    let mut it = args[1..].iter();
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} without a value"));
        match flag.as_str() {
            "--listen" | "--metrics-listen" => {}
            "--dns" => rest.extend([flag.clone(), format!("localhost:{}", port_of(&d.grpc))]),
            "--tls-cert" | "--tls-key" | "--tls-ca" => {
                rest.extend([flag.clone(), in_secret(Path::new(value)).display().to_string()])
            }
            _ => rest.extend([flag.clone(), value.clone()]),
        }
    }
    let router = RouterProc::start(&[], &rest.iter().map(String::as_str).collect::<Vec<_>>());
    let (listen, metrics) = (router.addr.clone(), router.metrics.clone());
    eventually("the router follows the daemon", || {
        http_get(&metrics, "/metrics").is_some_and(|m| m.contains("kvtier_router_endpoints_healthy 1"))
    });
    assert_eq!(http_get(&metrics, "/healthz").as_deref().map(str::trim), Some("ok"));
    let channel = kvtier_router::feed::channel(&listen).await.unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    // Every query of the dashboard names exported families, grouped by labels they carry.
    let mut exported = metric_families(&d.http_get("/metrics"));
    exported.extend(metric_families(&http_get(&metrics, "/metrics").unwrap()));
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("deploy/grafana/kvtier.json")).unwrap()).unwrap();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let (expr, legend) = (target["expr"].as_str().unwrap(), target["legendFormat"].as_str().unwrap_or(""));
            let (names, labels) = query_names(expr, legend);
            assert!(!names.is_empty(), "{expr}: no kvtier metric");
            let mut carried = BTreeSet::new();
            for name in &names {
                let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
                let family = exported.get(name.as_str()).or_else(|| exported.get(base));
                let family = family.unwrap_or_else(|| panic!("{expr}: {name} is not exported"));
                if name != base {
                    assert_eq!(family.kind, "histogram", "{expr}: {name} of a {}", family.kind);
                }
                carried.extend(family.labels.iter().cloned());
            }
            for label in labels {
                assert!(carried.contains(&label), "{expr}: no label {label} on {names:?}");
            }
            queries += 1;
        }
    }
    assert!(queries >= 20, "{queries} queries");
}

/// Packages whose files the dynamic libraries `binary` links are in (`ldd`, `dpkg -S`).
fn linked_packages(binary: &Path) -> BTreeSet<String> {
    let ldd = ok_stdout(&Command::new("ldd").arg(binary).output().expect("ldd"));
    let mut out = BTreeSet::new();
    for lib in ldd.lines().filter_map(|l| l.split("=> ").nth(1)).filter_map(|l| l.split_whitespace().next()) {
        let real = std::fs::canonicalize(lib).unwrap();
        let owner = [real.as_path(), Path::new(lib)].iter().find_map(|p| {
            let o = Command::new("dpkg").arg("-S").arg(p).output().ok()?;
            o.status.success().then(|| String::from_utf8_lossy(&o.stdout).into_owned())
        });
        let owner = owner.unwrap_or_else(|| panic!("{lib}: in no Debian package"));
        out.insert(owner.split(':').next().unwrap().to_string());
    }
    out
}

/// Packages of a Debian base image: the essential ones and everything they depend on.
fn base_image_packages() -> BTreeSet<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package}\t${Essential}\t${Pre-Depends}, ${Depends}\n"])
        .output()
        .expect("dpkg-query");
    let mut deps = BTreeMap::new();
    let mut queue = VecDeque::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut f = line.split('\t');
        let (name, essential, depends) = (f.next().unwrap(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        let names: Vec<String> = depends
            .split([',', '|'])
            .map(|d| d.trim().split([' ', ':']).next().unwrap().to_string())
            .filter(|d| !d.is_empty())
            .collect();
        deps.insert(name.to_string(), names);
        if essential == "yes" {
            queue.push_back(name.to_string());
        }
    }
    let mut seen = BTreeSet::new();
    while let Some(p) = queue.pop_front() {
        if seen.insert(p.clone()) {
            queue.extend(deps.get(&p).into_iter().flatten().cloned());
        }
    }
    seen
}

#[test]
fn the_image_installs_every_library_the_binaries_link_and_ships_the_binaries_the_manifests_run() {
    let dockerfile = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    let runtime = dockerfile.rsplit("\nFROM ").next().unwrap();
    let install = runtime.split("apt-get install").nth(1).expect("the runtime stage installs packages");
    let installed: BTreeSet<&str> =
        install.split("&&").next().unwrap().split_whitespace().filter(|w| !w.starts_with('-') && *w != "\\").collect();
    let base = base_image_packages();
    for name in ["kvtierd", "kvtier"] {
        for package in linked_packages(&bin(name)) {
            assert!(
                installed.contains(package.as_str()) || base.contains(&package),
                "{name} links a library of {package}: neither in the base image nor installed ({installed:?})"
            );
        }
        assert!(runtime.contains(&format!("target/release/{name} ")), "the image copies {name}");
    }
    for (file, kind, workload) in
        [("kvtierd.yaml", "DaemonSet", "kvtierd"), ("router.yaml", "Deployment", "kvtier-router")]
    {
        let command = strings(&container(object(&manifests(file), kind, workload))["command"]);
        assert!(["kvtierd", "kvtier"].contains(&command[0].as_str()), "{workload} runs {command:?}");
    }
    let engine = std::fs::read_to_string(repo().join("deploy/engine.Dockerfile")).unwrap();
    let copied = engine.lines().find_map(|l| l.strip_prefix("COPY ")).expect("the connector is copied");
    assert!(repo().join(copied.split_whitespace().next().unwrap()).join("pyproject.toml").exists());
}

/// The Service port named `name`'s target: a container port of `c`, by name or number.
fn target_container_port(svc: &Yaml, name: &str, c: &Yaml) -> i64 {
    let port = items(&svc["spec"]["ports"]).iter().find(|p| p["name"].as_str() == Some(name)).expect("port");
    match &port["targetPort"] {
        Yaml::String(named) => container_port(c, named),
        Yaml::Integer(n) => *n,
        _ => port["port"].as_i64().unwrap(),
    }
}

#[test]
fn the_inference_pool_example_wires_the_gateway_to_the_picker_and_the_picker_to_the_engines() {
    let docs = manifests("examples/inference-pool.yaml");
    let pool = docs.iter().find(|d| d["kind"].as_str() == Some("InferencePool")).expect("an InferencePool");
    let ns = pool["metadata"]["namespace"].as_str().unwrap();
    // The v1 API's rules (api/v1/inferencepool_types.go of the Gateway API Inference Extension).
    assert_eq!(pool["apiVersion"].as_str(), Some("inference.networking.k8s.io/v1"));
    let spec = pool["spec"].as_hash().unwrap();
    for key in spec.keys() {
        let key = key.as_str().unwrap();
        assert!(["selector", "targetPorts", "endpointPickerRef", "appProtocol"].contains(&key), "spec.{key}");
    }
    let selector = pool["spec"]["selector"]["matchLabels"].as_hash().expect("selector.matchLabels only");
    assert!((1..=64).contains(&selector.len()));
    assert_eq!(pool["spec"]["selector"].as_hash().unwrap().len(), 1, "matchLabels is the only selector field");
    let ports: Vec<i64> = items(&pool["spec"]["targetPorts"]).iter().map(|p| p["number"].as_i64().unwrap()).collect();
    assert!((1..=8).contains(&ports.len()) && ports.iter().all(|p| (1..=65535).contains(p)));
    assert_eq!(ports.iter().collect::<BTreeSet<_>>().len(), ports.len(), "targetPorts are unique");
    let epp = &pool["spec"]["endpointPickerRef"];
    assert!(["FailOpen", "FailClose"].contains(&epp["failureMode"].as_str().unwrap()));
    assert!(epp["kind"].is_badvalue() || epp["kind"].as_str() == Some("Service"));

    // The pool selects the engine pods of vllm.yaml on the port they serve and announce.
    let engine = &manifests("examples/vllm.yaml")[0];
    let labels = engine["spec"]["template"]["metadata"]["labels"].as_hash().unwrap();
    for (k, v) in selector {
        assert_eq!(labels.get(k), Some(v), "the pool selects {k:?} the engine pods lack");
    }
    let ec = container(engine);
    let eargs = strings(&ec["args"]);
    let http = container_port(ec, "http");
    assert_eq!(ports, vec![http]);
    assert_eq!(flag_value(&eargs, "--port").parse::<i64>().unwrap(), http);
    let kv: serde_json::Value = serde_json::from_str(flag_value(&eargs, "--kv-transfer-config")).unwrap();
    assert_eq!(kv["kv_connector_extra_config"]["engine_address"].as_str(), Some(format!("$(POD_IP):{http}").as_str()));

    // The picker reference resolves to the picker's ext_proc port, in the pool's namespace.
    let svc = object(&docs, "Service", epp["name"].as_str().unwrap());
    assert_eq!(svc["metadata"]["namespace"].as_str(), Some(ns));
    let picker = object(&docs, "Deployment", "kvtier-picker");
    let pc = container(picker);
    let pargs = strings(&pc["args"]);
    assert_eq!(pargs[0], "picker");
    let ref_port = items(&svc["spec"]["ports"])
        .iter()
        .find(|p| p["port"].as_i64() == epp["port"]["number"].as_i64())
        .expect("the endpointPickerRef port is a port of the picker Service");
    let ext_proc = target_container_port(svc, ref_port["name"].as_str().unwrap(), pc);
    assert_eq!(port_of(flag_value(&pargs, "--listen")), ext_proc);
    let health = port_of(flag_value(&pargs, "--health-listen"));
    assert_eq!(pc["readinessProbe"]["grpc"]["port"].as_i64(), Some(health));
    assert_eq!(pc["readinessProbe"]["grpc"]["service"].as_str(), Some("readiness"));
    assert_eq!(pc["livenessProbe"]["grpc"]["service"].as_str(), Some("liveness"));
    let name_label = "app.kubernetes.io/name";
    assert_eq!(svc["spec"]["selector"][name_label], picker["spec"]["template"]["metadata"]["labels"][name_label]);

    // --engine-dns names the engines' headless Service, which selects the pool's pods.
    let engines = flag_value(&pargs, "--engine-dns");
    let (host, port) = engines.rsplit_once(':').unwrap();
    let name = host.split('.').next().unwrap();
    let headless = object(&docs, "Service", name);
    assert_eq!(host, format!("{name}.{ns}.svc.cluster.local"));
    assert_eq!(headless["spec"]["clusterIP"].as_str(), Some("None"));
    assert_eq!(headless["spec"]["selector"], pool["spec"]["selector"]["matchLabels"]);
    assert_eq!(service_port(headless, "http"), port.parse::<i64>().unwrap());

    // Every flag the picker is given exists.
    let help = ok_stdout(&Command::new(bin("kvtier")).args(["picker", "--help"]).output().unwrap());
    for flag in pargs.iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(&format!("{flag} ")), "kvtier picker has no {flag}");
    }

    // The HTTPRoute sends the Gateway's traffic to the pool.
    let route = docs.iter().find(|d| d["kind"].as_str() == Some("HTTPRoute")).unwrap();
    let backend = &route["spec"]["rules"][0]["backendRefs"][0];
    assert_eq!(backend["group"].as_str(), Some("inference.networking.k8s.io"));
    assert_eq!(backend["kind"].as_str(), Some("InferencePool"));
    assert_eq!(backend["name"], pool["metadata"]["name"]);

    // The core objects validate against the Kubernetes schemas (the two CRDs are checked above).
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("core.yaml");
    let mut text = String::new();
    for d in docs.iter().filter(|d| ["Service", "Deployment"].contains(&d["kind"].as_str().unwrap())) {
        let mut out = String::new();
        yaml_rust2::YamlEmitter::new(&mut out).dump(d).unwrap();
        text.push_str(&out);
        text.push('\n');
    }
    std::fs::write(&file, text).unwrap();
    let out = Command::new(validator()).arg("--strict").arg("--quiet").arg(&file).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}
