//! The shape of the code, checked: no import cycle between modules of any crate, and the crates
//! link only what they should (`docs/architecture.md`, "Crates").

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The crates whose modules must not import each other in a cycle.
const CRATES: &[&str] = &["proto", "core", "net", "daemon", "router", "gateway", "client", "ucx"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `a::b` for `src/a/b.rs` or `src/a/b/mod.rs`; "" for the crate root.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts.join("::")
}

/// The code of a file without its unit tests (tests may reach anywhere).
fn without_tests(text: &str) -> &str {
    let mut at = 0;
    while let Some(i) = text[at..].find("#[cfg(test)]") {
        let rest = text[at + i + "#[cfg(test)]".len()..].trim_start();
        if rest.starts_with("mod ") {
            return &text[..at + i];
        }
        at += i + 1;
    }
    text
}

/// Every `crate::x::y` and `super::x` path in `text`, as written.
fn paths_after<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = text[at..].find(prefix) {
        let start = at + i;
        let ok_before =
            start == 0 || !text.as_bytes()[start - 1].is_ascii_alphanumeric() && text.as_bytes()[start - 1] != b'_';
        let body = start + prefix.len();
        let end = text[body..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .map_or(text.len(), |e| body + e);
        if ok_before {
            out.push(text[body..end].trim_end_matches(':'));
        }
        at = end.max(start + 1);
    }
    out
}

/// The module graph of one crate: module -> modules it imports (not its ancestors or descendants).
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeMap<String, PathBuf> = files.iter().map(|f| (module_of(src, f), f.clone())).collect();
    let related = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}::")) || b.starts_with(&format!("{a}::"));
    let mut graph = BTreeMap::new();
    for (m, f) in &modules {
        let text = std::fs::read_to_string(f).unwrap();
        let code = without_tests(&text);
        let parent = m.rsplit_once("::").map_or("", |(p, _)| p).to_string();
        let mut targets = BTreeSet::new();
        let mut add = |path: String| {
            // The longest prefix of the path that names a module.
            let parts: Vec<&str> = path.split("::").collect();
            for k in (1..=parts.len()).rev() {
                let candidate = parts[..k].join("::");
                if modules.contains_key(&candidate) {
                    if !related(m, &candidate) {
                        targets.insert(candidate);
                    }
                    return;
                }
            }
        };
        for p in paths_after(code, "crate::") {
            add(p.to_string());
        }
        for p in paths_after(code, "super::") {
            add(if parent.is_empty() { p.to_string() } else { format!("{parent}::{p}") });
        }
        graph.insert(m.clone(), targets);
    }
    graph
}

/// The strongly connected components of more than one module (Tarjan).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'g> {
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        next: usize,
        found: Vec<Vec<String>>,
    }
    fn visit<'g>(s: &mut State<'g>, v: &'g str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        for w in &s.graph[v] {
            if !s.index.contains_key(w.as_str()) {
                visit(s, w);
                let lw = s.low[w.as_str()];
                s.low.insert(v, s.low[v].min(lw));
            } else if s.stack.contains(&w.as_str()) {
                let iw = s.index[w.as_str()];
                s.low.insert(v, s.low[v].min(iw));
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                s.found.push(component);
            }
        }
    }
    let mut s =
        State { graph, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), next: 0, found: Vec::new() };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.found
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let mut problems = Vec::new();
    for krate in CRATES {
        let graph = module_graph(&repo().join(krate).join("src"));
        assert!(graph.len() > 1 || *krate == "proto" || *krate == "ucx", "{krate}: no modules found");
        for c in cycles(&graph) {
            problems.push(format!("{krate}: {}", c.join(" <-> ")));
        }
    }
    assert!(problems.is_empty(), "import cycles:\n{}", problems.join("\n"));
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("cache", &["events"][..]),
        ("events", &["cache"]),
        ("node", &["cache", "metrics"]),
        ("metrics", &["node"]),
        ("block", &[]),
    ]
    .into_iter()
    .map(|(m, to)| (m.to_string(), to.iter().map(|t| t.to_string()).collect()))
    .collect();
    let mut found: Vec<Vec<String>> = cycles(&graph)
        .into_iter()
        .map(|mut c| {
            c.sort();
            c
        })
        .collect();
    found.sort();
    assert_eq!(found, vec![vec!["cache".to_string(), "events".into()], vec!["metrics".to_string(), "node".into()]]);
    assert_eq!(paths_after("use crate::a::b; x_crate::c; super::d::E", "crate::"), vec!["a::b"]);
    assert_eq!(without_tests("fn a() {}\n#[cfg(test)]\nmod tests { use crate::x; }"), "fn a() {}\n");
}

/// The packages `cargo tree` lists for `package`'s normal (non-dev, non-build) dependencies.
fn linked(package: &str) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "--offline", "-e", "normal", "--prefix", "none", "--format", "{p}", "-p", package])
        .current_dir(repo())
        .output()
        .expect("running cargo tree");
    assert!(out.status.success(), "cargo tree -p {package}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_client_links_no_daemon_ucx_io_uring_redb_or_gpu_driver() {
    let linked = linked("kvtier-client");
    assert!(linked.contains("kvtier-core") && linked.contains("tokio"), "cargo tree output not understood: {linked:?}");
    for forbidden in ["kvtier-daemon", "kvtier-ucx", "io-uring", "redb", "cudarc", "cubecl-hip-sys"] {
        assert!(!linked.contains(forbidden), "kvtier-client links {forbidden}");
    }
}

#[test]
fn the_core_links_no_runtime_or_system_crates() {
    let linked = linked("kvtier-core");
    assert!(linked.contains("kvtier-proto"), "cargo tree output not understood: {linked:?}");
    for forbidden in ["tokio", "nix", "libc", "tonic", "io-uring", "redb", "memmap2", "kvtier-net"] {
        assert!(!linked.contains(forbidden), "kvtier-core links {forbidden}");
    }
}
