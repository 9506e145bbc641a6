//! The reference cannot drift from the code: the README's configuration block holds every key
//! the daemon has and nothing it refuses, `docs/metrics.md` lists every metric the daemon
//! exports with the daemon's own help text (`KVTIER_REGEN=1` rewrites it), and the README's CLI
//! table names every `kvtier` subcommand.

use kvtier_daemon::config::Config;
use kvtier_tests::{bin, metric_families, ok_stdout, repo, Daemon, TRANSFER_OVER_TCP};
use std::collections::BTreeSet;
use std::process::Command;

/// `section.key` of every `key = ...` line of a TOML text, by its `[section]` header.
fn keys(toml: &str) -> BTreeSet<String> {
    let mut section = String::new();
    let mut out = BTreeSet::new();
    for line in toml.lines().map(|l| l.split('#').next().unwrap().trim()) {
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
        } else if let Some((key, _)) = line.split_once('=') {
            out.insert(format!("{section}.{}", key.trim()));
        }
    }
    out
}

/// The first fenced block of `kind` after the heading `heading` in `text`.
fn block_after<'a>(text: &'a str, heading: &str, kind: &str) -> &'a str {
    let at = text.find(heading).unwrap_or_else(|| panic!("no {heading:?}"));
    let open = format!("```{kind}\n");
    let start = at + text[at..].find(&open).expect("a fenced block") + open.len();
    &text[start..start + text[start..].find("```").expect("its end")]
}

#[test]
fn the_readmes_configuration_block_is_every_key_the_daemon_has() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let block = block_after(&readme, "## Configuration", "toml");
    // The daemon's own loader accepts it (unknown keys are refused) ...
    Config::from_toml(block).unwrap_or_else(|e| panic!("README's configuration block: {e:#}"));
    // ... and it names every key the daemon prints.
    let printed = ok_stdout(&Command::new(bin("kvtierd")).arg("--print-config").output().unwrap());
    let (documented, actual) = (keys(block), keys(&printed));
    let missing: Vec<_> = actual.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&actual).collect();
    assert!(missing.is_empty() && extra.is_empty(), "README lacks {missing:?}; README has unknown {extra:?}");
}

#[test]
fn the_readmes_cli_table_names_every_subcommand() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let table = &readme[readme.find("## CLI").expect("a CLI section")..];
    let help = ok_stdout(&Command::new(bin("kvtier")).arg("--help").output().unwrap());
    let commands: Vec<&str> = (help.lines())
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 10, "{help}");
    for c in commands {
        assert!(table.contains(&format!("| `kvtier {c}")), "README's CLI table lacks `kvtier {c}`");
    }
}

#[test]
fn docs_metrics_lists_every_metric_the_daemon_exports() {
    // Every family: a disk tier, daemon-to-daemon transfer and a copy served, so that nothing
    // conditional is left out.
    let spill = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap(); // O_DIRECT: not tmpfs
    let disk = ["--disk-dir", spill.path().to_str().unwrap(), "--disk-bytes-per-dir", "64 MiB"];
    let args = [&disk[..], TRANSFER_OVER_TCP].concat();
    let d = Daemon::start_with_metrics(&args, true);
    ok_stdout(&d.kvtier(&["put", "--count", "4"]));
    let exported = metric_families(&d.http_get("/metrics"));
    let mut table = String::from(
        "# Metrics reference\n\nEvery metric `kvtierd` exports on `/metrics`, with the daemon's own help text. Generated \
         from a running daemon by `KVTIER_REGEN=1 cargo test -p kvtier-tests --test docs`; `tests/docs.rs` fails when \
         this page and the daemon differ. The scalars are declared once in `daemon/src/counters.rs` (also sent in \
         `StatsReply.counters`, `kvtier status --counters`); the labelled families are rendered in \
         `daemon/src/metrics.rs`. The `kvtier_disk_*` scalars are exported only with a disk tier; the router's \
         metrics are in `docs/router.md`.\n\n| metric | type | what it is |\n|---|---|---|\n",
    );
    for (name, f) in &exported {
        table += &format!("| `{name}` | {} | {} |\n", f.kind, f.help.replace('|', "\\|"));
    }
    let path = repo().join("docs/metrics.md");
    if std::env::var_os("KVTIER_REGEN").is_some() {
        std::fs::write(&path, &table).unwrap();
    }
    let page = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(page == table, "docs/metrics.md differs from what the daemon exports: KVTIER_REGEN=1 rewrites it");
}

#[test]
fn every_page_in_docs_is_reachable_from_the_docs_index() {
    let index = std::fs::read_to_string(repo().join("docs/README.md")).unwrap();
    for e in std::fs::read_dir(repo().join("docs")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".md") && name != "README.md" {
            assert!(index.contains(&format!("]({name})")), "docs/README.md does not link {name}");
        }
    }
}
