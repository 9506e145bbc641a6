//! `kvtier top`: a live view of one daemon, refreshed every interval: what each tier holds and,
//! per second over the last interval, blocks lookups found and missed, bytes saved and loaded, evictions
//! and disk traffic. `--json` prints one line per interval instead (totals and the interval's
//! deltas), for scripts; a daemon that goes away is reconnected to.

use super::common::{tier_json, tier_line, ConnectArgs};
use bytesize::ByteSize;
use kvtier_proto::v1::StatsReply;
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

/// What changed between two samples of a daemon's counters (`--json` prints it as is).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Delta {
    /// Seconds between the samples.
    pub secs: f64,
    /// Blocks found by lookups.
    pub hit_blocks: u64,
    /// Of them, found only on disk.
    pub disk_hit_blocks: u64,
    /// Blocks lookups did not find.
    pub miss_blocks: u64,
    /// Bytes committed.
    pub saved_bytes: u64,
    /// Bytes acquired.
    pub loaded_bytes: u64,
    /// Blocks evicted from the host tier.
    pub evicted_blocks: u64,
    /// Blocks written to disk.
    pub demoted_blocks: u64,
    /// Blocks read back from disk.
    pub promoted_blocks: u64,
    /// Bytes written to disk.
    pub disk_written_bytes: u64,
    /// Disk slots found corrupt (never served).
    pub corrupt_blocks: u64,
}

impl Delta {
    /// The change from `prev` to `cur`, `secs` apart. A counter that went down (the daemon
    /// restarted) counts from zero.
    pub fn between(prev: &StatsReply, cur: &StatsReply, secs: f64) -> Self {
        let d = |f: fn(&StatsReply) -> u64| {
            let (a, b) = (f(prev), f(cur));
            if b >= a {
                b - a
            } else {
                b
            }
        };
        Self {
            secs,
            hit_blocks: d(|s| s.hit_blocks),
            disk_hit_blocks: d(|s| s.disk_hit_blocks),
            miss_blocks: d(|s| s.miss_blocks),
            saved_bytes: d(|s| s.saved_bytes),
            loaded_bytes: d(|s| s.loaded_bytes),
            evicted_blocks: d(|s| s.evicted_blocks),
            demoted_blocks: d(|s| s.demoted_blocks),
            promoted_blocks: d(|s| s.promoted_blocks),
            disk_written_bytes: d(|s| s.disk_written_bytes),
            corrupt_blocks: d(|s| s.corrupt_blocks),
        }
    }

    /// `n` per second over the interval.
    pub fn rate(&self, n: u64) -> f64 {
        n as f64 / self.secs.max(1e-9)
    }

    /// Share of the interval's looked-up blocks that were found (None: no lookups).
    pub fn hit_rate(&self) -> Option<f64> {
        let asked = self.hit_blocks + self.miss_blocks;
        (asked > 0).then(|| self.hit_blocks as f64 / asked as f64)
    }
}

/// One screen of `kvtier top`: the daemon's tiers, and the interval's rates when there was one.
pub fn screen(s: &StatsReply, delta: Option<&Delta>) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "kvtierd {}  eviction {}  clients {}  namespaces {}",
        s.daemon_version, s.eviction_policy, s.clients, s.namespaces
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
    let per_s = |n: u64| format!("{}/s", ByteSize(d.rate(n) as u64));
    let hit_rate = d.hit_rate().map_or("-".to_string(), |r| format!("{r:.3}"));
    let _ = writeln!(o, "  per second over the last {:.1} s:", d.secs);
    let _ = writeln!(
        o,
        "  hits {:>9.1}  misses {:>9.1}  hit rate {hit_rate:>5}  from disk {:>7.1}",
        d.rate(d.hit_blocks),
        d.rate(d.miss_blocks),
        d.rate(d.disk_hit_blocks)
    );
    let _ = writeln!(
        o,
        "  saved {:>12}  loaded {:>12}  evicted {:>9.1} blocks",
        per_s(d.saved_bytes),
        per_s(d.loaded_bytes),
        d.rate(d.evicted_blocks)
    );
    if s.tiers.iter().any(|t| t.tier() == kvtier_proto::v1::Tier::Disk) {
        let _ = writeln!(
            o,
            "  disk written {:>12}  demoted {:>7.1}  promoted {:>7.1}  corrupt {}",
            per_s(d.disk_written_bytes),
            d.rate(d.demoted_blocks),
            d.rate(d.promoted_blocks),
            d.corrupt_blocks
        );
    }
    o
}

/// One `--json` line: the totals and, after the first sample, the interval's deltas.
fn json_line(s: &StatsReply, delta: Option<&Delta>) -> serde_json::Value {
    let tiers: Vec<_> = s.tiers.iter().map(tier_json).collect();
    serde_json::json!({"tiers": tiers, "clients": s.clients, "namespaces": s.namespaces,
        "hit_blocks": s.hit_blocks, "miss_blocks": s.miss_blocks, "saved_bytes": s.saved_bytes,
        "loaded_bytes": s.loaded_bytes, "disk_failure": s.disk_failure, "delta": delta})
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
    use kvtier_proto::v1::{Tier, TierStats};

    fn stats(hits: u64, misses: u64, saved: u64) -> StatsReply {
        StatsReply {
            hit_blocks: hits,
            miss_blocks: misses,
            saved_bytes: saved,
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
        assert_eq!((d.hit_blocks, d.miss_blocks, d.saved_bytes), (30, 10, 4000));
        assert_eq!(d.rate(d.hit_blocks), 15.0);
        assert_eq!(d.rate(d.saved_bytes), 2000.0);
        assert_eq!(d.hit_rate(), Some(0.75));
        assert_eq!(Delta::between(&stats(1, 1, 1), &stats(1, 1, 1), 1.0).hit_rate(), None);
    }

    #[test]
    fn a_restarted_daemon_counts_from_zero() {
        let d = Delta::between(&stats(100, 50, 9000), &stats(3, 1, 200), 1.0);
        assert_eq!((d.hit_blocks, d.miss_blocks, d.saved_bytes), (3, 1, 200));
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
