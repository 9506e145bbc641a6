//! Supervision of the daemon's background parts: every task and thread that works behind the
//! requests (demoter, persister, rings, peer lanes, servers, the load sampler) is a [`Part`]. A
//! part that panics, exits or stops making progress is marked down with the reason; the node's
//! watchdog then turns off what it served (the disk tier, peer transfers, daemon-side copies),
//! logs it, and reports the daemon not ready with the reason (health, `/readyz`, metrics,
//! `kvtier status`), while everything else keeps serving.
//!
//! Progress: a part with a stall bound calls [`Part::beat`] whenever it gets something done, and
//! [`Part::waiting`] around blocking waits for work; one that is neither waiting nor beating for
//! longer than its bound is stalled.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// What a part serves: what goes off when it fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The disk tier (demoter, persister, rings): off, host-only from then on.
    Disk,
    /// Daemon-to-daemon transfers (UCX lanes): pulls and offers refused.
    Transfer,
    /// Daemon-side copies of engine memory: connectors copy themselves.
    DeviceCopies,
    /// The router feed and transfer control (gRPC servers).
    Grpc,
    /// The metrics endpoint.
    Metrics,
    /// The load sampler (the router's load signal).
    Load,
}

impl Role {
    /// How the role is named in health details and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Role::Disk => "disk tier",
            Role::Transfer => "daemon-to-daemon transfers",
            Role::DeviceCopies => "daemon-side copies",
            Role::Grpc => "gRPC (router feed, transfers)",
            Role::Metrics => "metrics endpoint",
            Role::Load => "load signal",
        }
    }
}

fn clock() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// One supervised task or thread.
pub struct Part {
    /// Its name (metrics label), e.g. `demoter`, `ring-0`, `lane-1`.
    pub name: String,
    /// What it serves.
    pub role: Role,
    stall_after: Option<Duration>,
    last_beat: AtomicU64,
    waiting: AtomicBool,
    down: Mutex<Option<String>>,
    handled: AtomicBool,
}

impl Part {
    /// Records progress now.
    pub fn beat(&self) {
        self.last_beat.store(clock(), Relaxed);
    }

    /// Marks the part as waiting for work (`true`: not stalled however long it waits) or back
    /// at work (`false`, which counts as progress).
    pub fn waiting(&self, waiting: bool) {
        if !waiting {
            self.beat();
        }
        self.waiting.store(waiting, Relaxed);
    }

    /// Marks the part down (the first reason stays).
    pub fn fail(&self, reason: impl Into<String>) {
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        if down.is_none() {
            *down = Some(reason.into());
        }
    }

    /// Why the part is down, if it is.
    pub fn down(&self) -> Option<String> {
        self.down.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Marks the part down if it has neither waited nor made progress within its bound.
    fn check_stall(&self, now: u64) {
        let Some(limit) = self.stall_after else { return };
        let since = now.saturating_sub(self.last_beat.load(Relaxed));
        if !self.waiting.load(Relaxed) && since > limit.as_millis() as u64 {
            self.fail(format!("stalled: no progress for {:.1} s", since as f64 / 1000.0));
        }
    }
}

/// Every supervised part of the daemon.
#[derive(Default)]
pub struct Parts {
    parts: Mutex<Vec<Arc<Part>>>,
}

impl Parts {
    /// Adds a part (`stall_after`: its progress bound, if it has one).
    pub fn add(&self, name: impl Into<String>, role: Role, stall_after: Option<Duration>) -> Arc<Part> {
        let part = Arc::new(Part {
            name: name.into(),
            role,
            stall_after,
            last_beat: AtomicU64::new(clock()),
            waiting: AtomicBool::new(false),
            down: Mutex::new(None),
            handled: AtomicBool::new(false),
        });
        self.parts.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::clone(&part));
        part
    }

    /// Every part.
    pub fn all(&self) -> Vec<Arc<Part>> {
        self.parts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Checks for stalls, and returns the parts newly down (each once): their roles must be
    /// turned off.
    pub fn newly_down(&self) -> Vec<(Arc<Part>, String)> {
        let now = clock();
        let mut out = Vec::new();
        for p in self.all() {
            p.check_stall(now);
            if let Some(reason) = p.down() {
                if !p.handled.swap(true, Relaxed) {
                    out.push((p, reason));
                }
            }
        }
        out
    }

    /// "name (role): reason" for every part down.
    pub fn problems(&self) -> Vec<String> {
        (self.all().iter())
            .filter_map(|p| p.down().map(|why| format!("{} ({} off): {why}", p.name, p.role.name())))
            .collect()
    }
}

/// The message of a panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "a panic without a message".into(),
    }
}

/// Runs `body` on a named thread as `part`: a panic marks the part down instead of vanishing,
/// and so does returning while `keep_running` says it should not have.
pub fn thread<T: Send + 'static>(
    part: Arc<Part>,
    body: impl FnOnce(&Part) -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<Option<T>>> {
    std::thread::Builder::new().name(format!("kvtier-{}", part.name)).spawn(move || {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&part))) {
            Ok(t) => Some(t),
            Err(payload) => {
                part.fail(format!("panicked: {}", panic_message(payload.as_ref())));
                None
            }
        }
    })
}

/// Spawns `task` as `part` on the runtime: a panic marks the part down, and so does finishing
/// (a supervised task runs as long as the daemon).
pub fn task(part: Arc<Part>, task: impl std::future::Future<Output = ()> + Send + 'static) {
    let handle = tokio::spawn(task);
    tokio::spawn(async move {
        match handle.await {
            Ok(()) => part.fail("exited"),
            Err(e) if e.is_panic() => part.fail(format!("panicked: {}", panic_message(e.into_panic().as_ref()))),
            Err(e) => part.fail(format!("stopped: {e}")),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_and_stalls_mark_parts_down_once_and_waiting_is_no_stall() {
        let parts = Parts::default();
        let boom = parts.add("boom", Role::Disk, None);
        let t = thread(Arc::clone(&boom), |_| panic!("kaput")).unwrap();
        assert!(t.join().unwrap().is_none());
        let slow = parts.add("slow", Role::Transfer, Some(Duration::from_millis(30)));
        let idle = parts.add("idle", Role::Transfer, Some(Duration::from_millis(30)));
        idle.waiting(true);
        std::thread::sleep(Duration::from_millis(60));
        let down = parts.newly_down();
        let names: Vec<_> = down.iter().map(|(p, why)| (p.name.as_str(), why.clone())).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(names[0], ("boom", "panicked: kaput".to_string()));
        assert!(names[1].0 == "slow" && names[1].1.starts_with("stalled"), "{names:?}");
        assert!(parts.newly_down().is_empty(), "each failure is handled once");
        assert_eq!(parts.problems().len(), 2);
        assert!(parts.problems()[0].contains("boom (disk tier off): panicked: kaput"));
        slow.beat();
        assert!(slow.down().is_some(), "a part that failed stays down");
    }

    #[tokio::test]
    async fn a_task_that_panics_or_ends_is_down() {
        let parts = Parts::default();
        let a = parts.add("a", Role::Grpc, None);
        let b = parts.add("b", Role::Load, None);
        task(Arc::clone(&a), async { panic!("no") });
        task(Arc::clone(&b), async {});
        for _ in 0..100 {
            if a.down().is_some() && b.down().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(a.down().as_deref(), Some("panicked: no"));
        assert_eq!(b.down().as_deref(), Some("exited"));
    }
}
