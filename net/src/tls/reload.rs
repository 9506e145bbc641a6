//! TLS files read again when they change.
//!
//! Certificates are rotated by replacing their files: cert-manager renews them well before they
//! expire, and a Kubernetes secret volume swaps a symlink to the new ones. A process that read
//! them once would present the old certificate until it expired and then be refused by every
//! peer, or need a restart, which for a daemon empties its host tier. So every new connection,
//! accepted or dialed, first checks the files' identity (three `stat`s) and reads them again if
//! it changed; connections already up keep what they negotiated. Files that do not load (the
//! certificate replaced, its key not yet) leave the previous ones in use, with a warning, until
//! they change again.

use super::TlsConfig;
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;

/// What identifies a file's contents without reading it: device, inode, modification time
/// (seconds, nanoseconds) and size; None for a file that cannot be read.
type Stamp = [Option<(u64, u64, i64, i64, u64)>; 3];

fn stamp(files: &TlsConfig) -> Stamp {
    [&files.cert, &files.key, &files.ca]
        .map(|p| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.len())))
}

struct State<T> {
    stamp: Stamp,
    value: T,
    generation: u64,
}

/// A value built from the TLS files (a server or a client configuration), built again whenever
/// the files change.
pub struct Reloading<T> {
    files: TlsConfig,
    build: fn(&TlsConfig) -> anyhow::Result<T>,
    state: Mutex<State<T>>,
}

impl<T: Clone> Reloading<T> {
    /// Builds the value from `files` now, so that bad files fail the start.
    pub fn new(files: TlsConfig, build: fn(&TlsConfig) -> anyhow::Result<T>) -> anyhow::Result<Self> {
        let stamp = stamp(&files);
        let value = build(&files)?;
        Ok(Self { files, build, state: Mutex::new(State { stamp, value, generation: 0 }) })
    }

    /// The value a new connection uses, with its generation (0 at start, one more at every
    /// reload: a cache of connections made with an older one should make new ones).
    pub fn current(&self) -> (u64, T) {
        let now = stamp(&self.files);
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if now != s.stamp {
            s.stamp = now;
            match (self.build)(&self.files) {
                Ok(value) => {
                    s.value = value;
                    s.generation += 1;
                    tracing::info!(cert = %self.files.cert.display(), "grpc.tls: the files changed; new connections use them");
                }
                Err(e) => tracing::warn!(
                    "grpc.tls: the files changed but do not load ({e:#}); new connections keep the previous ones"
                ),
            }
        }
        (s.generation, s.value.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &std::path::Path) -> TlsConfig {
        let p = |f: &str| dir.join(f);
        TlsConfig { cert: p("cert"), key: p("key"), ca: p("ca"), server_name: "kvtierd".into() }
    }

    /// The three files concatenated; an error if any says "bad".
    fn concat(f: &TlsConfig) -> anyhow::Result<String> {
        let mut text = String::new();
        for p in [&f.cert, &f.key, &f.ca] {
            text += &std::fs::read_to_string(p)?;
        }
        anyhow::ensure!(!text.contains("bad"), "bad file");
        Ok(text)
    }

    /// Replaces `path` the way a secret volume or cert-manager does: a new file renamed over it.
    fn replace(path: &std::path::Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[test]
    fn a_changed_file_is_read_again_and_one_that_does_not_load_keeps_the_last_good_value() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path());
        for (p, t) in [(&f.cert, "c1"), (&f.key, "k1"), (&f.ca, "a1")] {
            std::fs::write(p, t).unwrap();
        }
        let r = Reloading::new(f.clone(), concat).unwrap();
        assert_eq!(r.current(), (0, "c1k1a1".to_string()));
        assert_eq!(r.current(), (0, "c1k1a1".to_string()), "unchanged files are not read again");
        replace(&f.cert, "c2");
        assert_eq!(r.current(), (1, "c2k1a1".to_string()));
        replace(&f.key, "bad");
        assert_eq!(r.current(), (1, "c2k1a1".to_string()), "a file that does not load changes nothing");
        replace(&f.key, "k2");
        assert_eq!(r.current(), (2, "c2k2a1".to_string()));
        std::fs::remove_file(&f.ca).unwrap();
        assert_eq!(r.current(), (2, "c2k2a1".to_string()), "a missing file changes nothing");
    }

    #[test]
    fn files_that_do_not_load_at_start_fail_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path());
        for p in [&f.cert, &f.key, &f.ca] {
            std::fs::write(p, "bad").unwrap();
        }
        assert!(Reloading::new(f, concat).is_err());
    }
}
