//! `kvtier top`: a live view of one daemon, refreshed every interval: what each tier holds and,
//! per second over the last interval, blocks lookups found and missed, bytes saved and loaded, evictions
//! and disk traffic. `--json` prints one line per interval instead (totals and the interval's
//! deltas), for scripts; a daemon that goes away is reconnected to.

use super::common::{tier_json, tier_line, ConnectArgs};
use bytesize::ByteSize;
use kvtier_client::stats::{names, Counters};
use kvtier_proto::v1::StatsReply;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Arguments of `kvtier top`.
#[derive(clap::Args, Debug)]
pub struct TopArgs {
    #[command(flatten)]
    conn: ConnectArgs,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Stop after this many refreshes (default: until interrupted).
    #[arg(long)]
    count: Option<u64>,
    /// One JSON object per refresh (totals and the interval's deltas) instead of a screen.
    #[arg(long)]
    json: bool,
}

/// What changed between two samples of a daemon's counters (`--json` prints it as is): every
/// monotonic counter's increase, by name.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Delta {
    /// Seconds between the samples.
    pub secs: f64,
    /// Increase of each counter.
    #[serde(flatten)]
    pub increase: BTreeMap<String, u64>,
}

impl Delta {
    /// The change from `prev` to `cur`, `secs` apart. A counter that went down (the daemon
    /// restarted) counts from zero.
    pub fn between(prev: &StatsReply, cur: &StatsReply, secs: f64) -> Self {
        let before = prev.counter_map();
        let increase = (cur.counters.iter().filter(|c| c.monotonic))
            .map(|c| {
                let a = before.get(&c.name).copied().unwrap_or(0);
                (c.name.clone(), if c.value >= a { c.value - a } else { c.value })
            })
            .collect();
        Self { secs, increase }
    }

    /// How much counter `name` grew.
    pub fn of(&self, name: &str) -> u64 {
        self.increase.get(name).copied().unwrap_or(0)
    }

    /// Counter `name`'s growth per second over the interval.
    pub fn rate(&self, name: &str) -> f64 {
        self.of(name) as f64 / self.secs.max(1e-9)
    }

    /// Share of the interval's looked-up blocks that were found (None: no lookups).
    pub fn hit_rate(&self) -> Option<f64> {
        let (hits, asked) = (self.of(names::HITS), self.of(names::HITS) + self.of(names::MISSES));
        (asked > 0).then(|| hits as f64 / asked as f64)
    }
}

/// One screen of `kvtier top`: the daemon's tiers, and the interval's rates when there was one.
pub fn screen(s: &StatsReply, delta: Option<&Delta>) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "kvtierd {}  eviction {}  clients {}  namespaces {}",
        s.daemon_version,
        s.eviction_policy,
        s.counter(names::CLIENTS),
        s.counter(names::NAMESPACES)
    );
    for t in &s.tiers {
        let _ = writeln!(o, "{}", tier_line(t));
    }
    if !s.disk_failure.is_empty() {
        let _ = writeln!(o, "  disk tier OFF: {}", s.disk_failure);
    }
    for u in &s.namespace_usage {
        let _ = writeln!(o, "{}", super::status::namespace_line(u));
    }
    let Some(d) = delta else {
        let _ = writeln!(o, "  (rates after the next refresh)");
        return o;
    };
    let per_s = |name: &str| format!("{}/s", ByteSize(d.rate(name) as u64));
    let hit_rate = d.hit_rate().map_or("-".to_string(), |r| format!("{r:.3}"));
    let _ = writeln!(o, "  per second over the last {:.1} s:", d.secs);
    let _ = writeln!(
        o,
        "  hits {:>9.1}  misses {:>9.1}  hit rate {hit_rate:>5}  from disk {:>7.1}",
        d.rate(names::HITS),
        d.rate(names::MISSES),
        d.rate(names::DISK_HITS)
    );
    let _ = writeln!(
        o,
        "  saved {:>12}  loaded {:>12}  evicted {:>9.1} blocks",
        per_s(names::SAVED_BYTES),
        per_s(names::LOADED_BYTES),
        d.rate(names::EVICTED)
    );
    if s.tiers.iter().any(|t| t.tier() == kvtier_proto::v1::Tier::Disk) {
        let _ = writeln!(
            o,
            "  disk written {:>12}  demoted {:>7.1}  promoted {:>7.1}  corrupt {}",
            per_s(names::DISK_WRITTEN_BYTES),
            d.rate(names::DEMOTED),
            d.rate(names::PROMOTED),
            d.of(names::CORRUPT)
        );
    }
    o
}

/// One `--json` line: the totals and, after the first sample, the interval's deltas.
fn json_line(s: &StatsReply, delta: Option<&Delta>) -> serde_json::Value {
    let tiers: Vec<_> = s.tiers.iter().map(tier_json).collect();
    serde_json::json!({"tiers": tiers, "counters": s.counter_map(), "disk_failure": s.disk_failure,
        "delta": delta})
}

/// Refreshes until interrupted (or `--count` refreshes).
pub async fn run(args: TopArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.interval > 0.0, "--interval must be positive");
    let interval = Duration::from_secs_f64(args.interval);
    let clear = !args.json && std::io::stdout().is_terminal();
    let (mut client, mut last) = (None, None::<(StatsReply, Instant)>);
    let mut shown = 0;
    loop {
        if client.is_none() {
            client = args.conn.connect("top").await.ok();
        }
        let sample = match client.as_mut() {
            Some(c) => c.stats().await.ok(),
            None => None,
        };
        let now = Instant::now();
        match sample {
            Some(s) => {
                let delta = last.as_ref().map(|(p, at)| Delta::between(p, &s, (now - *at).as_secs_f64()));
                if args.json {
                    println!("{}", json_line(&s, delta.as_ref()));
                } else {
                    print!("{}{}", if clear { "\x1b[H\x1b[2J" } else { "\n" }, screen(&s, delta.as_ref()));
                }
                last = Some((s, now));
            }
            None => {
                // Gone (restarting?): reconnect next time; its counters start again.
                (client, last) = (None, None);
                eprintln!("kvtier top: no answer from {}", args.conn.socket.display());
            }
        }
        shown += 1;
        if args.count.is_some_and(|n| shown >= n) {
            return Ok(());
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvtier_proto::v1::{Counter, Tier, TierStats};

    fn stats(hits: u64, misses: u64, saved: u64) -> StatsReply {
        let counter = |name: &str, value| Counter { name: name.into(), help: String::new(), monotonic: true, value };
        StatsReply {
            counters: vec![
                counter(names::HITS, hits),
                counter(names::MISSES, misses),
                counter(names::SAVED_BYTES, saved),
            ],
            daemon_version: "0.1.0".into(),
            eviction_policy: "prefix-lfu".into(),
            tiers: vec![TierStats {
                tier: Tier::Host as i32,
                capacity_bytes: 1 << 30,
                used_bytes: 1 << 29,
                blocks: 512,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn deltas_and_rates_over_the_interval() {
        let d = Delta::between(&stats(10, 5, 1000), &stats(40, 15, 5000), 2.0);
        assert_eq!((d.of(names::HITS), d.of(names::MISSES), d.of(names::SAVED_BYTES)), (30, 10, 4000));
        assert_eq!(d.rate(names::HITS), 15.0);
        assert_eq!(d.rate(names::SAVED_BYTES), 2000.0);
        assert_eq!(d.hit_rate(), Some(0.75));
        assert_eq!(Delta::between(&stats(1, 1, 1), &stats(1, 1, 1), 1.0).hit_rate(), None);
    }

    #[test]
    fn a_restarted_daemon_counts_from_zero() {
        let d = Delta::between(&stats(100, 50, 9000), &stats(3, 1, 200), 1.0);
        assert_eq!((d.of(names::HITS), d.of(names::MISSES), d.of(names::SAVED_BYTES)), (3, 1, 200));
    }

    #[test]
    fn the_screen_shows_tiers_then_rates() {
        let first = screen(&stats(0, 0, 0), None);
        assert!(first.contains("host"), "{first}");
        assert!(first.contains("(50.0%)"), "{first}");
        assert!(first.contains("rates after the next refresh"), "{first}");
        let d = Delta::between(&stats(0, 0, 0), &stats(30, 10, 4 << 20), 2.0);
        let next = screen(&stats(30, 10, 4 << 20), Some(&d));
        assert!(next.contains("hit rate 0.750"), "{next}");
        assert!(next.contains("2.0 MiB/s"), "{next}");
        assert!(!next.contains("disk written"), "no disk tier: {next}");
    }
}
