//! Test support: start real `kvtierd` processes on private sockets and run the real `kvtier` CLI.
//!
//! Binaries are found next to the test executable (`target/<profile>/`); build them first with
//! `cargo build --workspace --bins` (the project's test script does), or point `KVTIERD_BIN` /
//! `KVTIER_BIN` at them.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary.
pub fn bin(name: &str) -> PathBuf {
    let var = format!("{}_BIN", name.to_uppercase());
    if let Some(p) = std::env::var_os(&var) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let path = dir.join(name);
    assert!(path.exists(), "{} not found: run `cargo build --workspace --bins` first (or set {var})", path.display());
    path
}

/// A running kvtierd in its own temporary directory; SIGKILLed on drop.
pub struct Daemon {
    child: Option<Child>,
    /// Temporary directory holding the socket and the log.
    pub dir: tempfile::TempDir,
    /// Connector socket.
    pub socket: PathBuf,
    /// Metrics address, when enabled.
    pub metrics: Option<String>,
    /// Address of the router feed (gRPC over TCP), kept across restarts.
    pub grpc: String,
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

/// Daemon-to-daemon transfer over TCP on loopback (what tests and benchmarks of two daemons on
/// one machine use).
pub const TRANSFER_OVER_TCP: &[&str] = &["--transfer", "--ucx-transports", "tcp", "--transfer-net-devices", "lo"];

/// Pool of test daemons unless the caller passes `--pool-bytes`: 32 MiB of 1 MiB slabs.
pub const SMALL_POOL: &[&str] = &["--pool-bytes", "32 MiB", "--slab-bytes", "1 MiB"];

impl Daemon {
    /// Starts kvtierd with `extra` flags after the test defaults; waits until it accepts.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with_metrics(extra, false)
    }

    /// Like [`start`](Self::start), with metrics on a free local port if `metrics`.
    pub fn start_with_metrics(extra: &[&str], metrics: bool) -> Self {
        Self::start_with_env(extra, metrics, &[])
    }

    /// Like [`start_with_metrics`](Self::start_with_metrics), with `env` set for the daemon.
    pub fn start_with_env(extra: &[&str], metrics: bool, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("kvtierd.sock");
        let metrics = metrics.then(free_local_addr);
        let extra = extra.iter().map(|s| s.to_string()).collect();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut d = Self { child: None, dir, socket, metrics, grpc: free_local_addr(), extra, env };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("kvtierd.log"))
            .expect("log file");
        let mut cmd = Command::new(bin("kvtierd"));
        cmd.arg("--socket").arg(&self.socket).arg("--allow-unlocked");
        cmd.arg("--metrics-listen").arg(self.metrics.clone().unwrap_or_default());
        cmd.arg("--grpc-listen").arg(&self.grpc).arg("--grpc-socket").arg(self.dir.path().join("grpc.sock"));
        if !self.extra.iter().any(|a| a.starts_with("--grpc-tls")) {
            // Plain-text gRPC on loopback for tests that do not test TLS.
            cmd.arg("--grpc-insecure");
        }
        if !self.extra.iter().any(|a| a == "--pool-bytes") {
            cmd.args(SMALL_POOL);
        }
        cmd.args(&self.extra);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.env("RUST_LOG", std::env::var("KVTIERD_LOG").unwrap_or_else(|_| "debug".into()))
            .env_remove("KVTIER_CONFIG")
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(cmd.spawn().expect("spawn kvtierd"));
        self.wait_ready();
    }

    /// Runs kvtierd with the test defaults and `extra` flags where it must refuse to start:
    /// asserts it exited unsuccessfully within 60 s; returns its stderr.
    pub fn start_refused(extra: &[&str]) -> String {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cmd = Command::new(bin("kvtierd"));
        cmd.arg("--socket").arg(dir.path().join("kvtierd.sock")).args(["--allow-unlocked", "--metrics-listen", ""]);
        for (flag, default) in [("--grpc-listen", ""), ("--grpc-socket", "")] {
            if !extra.contains(&flag) {
                cmd.args([flag, default]);
            }
        }
        cmd.args(SMALL_POOL).args(extra);
        let mut child = cmd.env_remove("KVTIER_CONFIG").stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("kvtierd {extra:?} started when it should have refused");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        assert!(!status.success(), "kvtierd {extra:?} exited successfully: {stderr}");
        stderr
    }

    /// SIGKILLs the daemon and starts a new one on the same socket with the same flags.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// SIGKILLs the daemon and starts a new one on the same socket with new `extra` flags.
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.restart();
    }

    /// Sends SIGTERM and waits (up to 60 s) for a clean exit.
    pub fn terminate(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if c.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        panic!("kvtierd did not exit within 60 s of SIGTERM:\n{}", self.log());
    }

    /// Value of a metric without labels, from the metrics endpoint (0 if absent).
    pub fn metric(&self, name: &str) -> f64 {
        let body = self.http_get("/metrics");
        let prefix = format!("{name} ");
        body.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("kvtierd exited with {status}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("kvtierd did not accept within 30 s:\n{}", self.log());
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kvtierd.log")).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// How the daemon ended, if it did (None: still running, or killed by [`kill`](Self::kill)).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILLs the daemon and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs the `kvtier` CLI against this daemon.
    pub fn kvtier(&self, args: &[&str]) -> Output {
        Command::new(bin("kvtier")).args(args).env("KVTIER_SOCKET", &self.socket).output().expect("run kvtier")
    }

    /// Runs the `kvtier` CLI against this daemon as another `uid` (and gid): (success, stdout
    /// and stderr). The daemon's directory is opened to others (a test temp dir is private, as
    /// `/run/kvtier` is not) and the CLI copied there (the build's directory may be private).
    pub fn kvtier_as(&self, uid: u32, args: &[&str]) -> (bool, String) {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let cli = self.dir.path().join("kvtier");
        if !cli.exists() {
            std::fs::copy(bin("kvtier"), &cli).unwrap();
            std::fs::set_permissions(&cli, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        // The copy was open for writing: a child another test thread forked meanwhile holds
        // that descriptor until it execs, and exec fails with ETXTBSY until then.
        let mut tries = 0;
        let out = loop {
            match Command::new(&cli).args(args).env("KVTIER_SOCKET", &self.socket).uid(uid).gid(uid).output() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                out => break out.expect("run kvtier as another uid"),
            }
        };
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    }

    /// GET `path` from the metrics endpoint; returns the body.
    pub fn http_get(&self, path: &str) -> String {
        let addr = self.metrics.as_ref().expect("metrics enabled");
        http_get(addr, path).unwrap_or_else(|| panic!("GET {path} from {addr}"))
    }

    /// Connects the Rust client.
    pub async fn client(&self, name: &str) -> kvtier_client::Client {
        kvtier_client::Client::connect(&self.socket, name).await.expect("connect client")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// GET `path` from the HTTP server at `addr`: the body (None: not reachable).
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or(out))
}

/// A free TCP address on loopback (`127.0.0.1:PORT`) for a process to listen on, below the
/// kernel's ephemeral range: a port from that range (what binding port 0 gives) can be taken by
/// any outgoing connection (gRPC, UCX over TCP) between this check and the process's bind, which
/// made daemons fail to start with "Address already in use" now and then.
pub fn free_local_addr() -> String {
    use std::hash::BuildHasher;
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let ephemeral_low: u16 = range.split_whitespace().next().and_then(|p| p.parse().ok()).unwrap_or(32768);
    let (low, high) = (ephemeral_low.saturating_sub(12_000).max(1024), ephemeral_low);
    let random = std::collections::hash_map::RandomState::new();
    for attempt in 0u64.. {
        let port = low + (random.hash_one((std::process::id(), attempt)) % u64::from(high - low)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return format!("127.0.0.1:{port}");
        }
        assert!(attempt < 10_000, "no free port in {low}..{high}");
    }
    unreachable!()
}

/// Registration of KV tensors in this process, one per layer, in vLLM's FlashAttention layout
/// (`[2, blocks, chunk]` per layer), for daemon-side copies.
pub fn flash_attention_kv_cache(
    handle: u32,
    tensors: &[&[u8]],
    blocks: u64,
    chunk: u64,
) -> kvtier_proto::v1::RegisterKvCache {
    use kvtier_proto::v1 as pb;
    pb::RegisterKvCache {
        handle,
        tensors: (tensors.iter())
            .map(|t| pb::KvTensor { address: t.as_ptr() as u64, bytes: t.len() as u64, ..Default::default() })
            .collect(),
        layers: (0..tensors.len() as u32)
            .map(|l| pb::KvLayerPlacement { tensor: l, offset: 0, block_stride: chunk, kv_stride: blocks * chunk })
            .collect(),
        num_blocks: blocks,
        kv_parts: 2,
        chunk_bytes: chunk,
    }
}

/// A namespace descriptor for tests.
pub fn namespace(model: &str, block_bytes: u64) -> kvtier_client::NamespaceDescriptor {
    kvtier_client::NamespaceDescriptor {
        model: model.into(),
        kv_dtype: "float32".into(),
        tokens_per_block: 16,
        layout: "test".into(),
        block_bytes,
        ..Default::default()
    }
}

/// The test content of each hash.
pub fn blocks_for(hashes: &[bytes::Bytes], len: usize) -> Vec<Vec<u8>> {
    hashes.iter().map(|h| kvtier_client::testdata::block(h, len)).collect()
}

/// Borrows each block as a slice.
pub fn refs(blocks: &[Vec<u8>]) -> Vec<&[u8]> {
    blocks.iter().map(|b| &b[..]).collect()
}

/// Polls `f` until it returns true or 10 s pass.
pub fn eventually(what: &str, f: impl FnMut() -> bool) {
    eventually_within(what, 10, f)
}

/// Polls `f` until it returns true or `secs` seconds pass.
pub fn eventually_within(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for: {what}");
}

/// Text of a CLI run's stdout, asserting success.
pub fn ok_stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "kvtier failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Python of the venv with the real vLLM: `KVTIER_VLLM_PYTHON`, or the one `scripts/vllm-venv`
/// creates (once, cached under `~/.cache/kvtier`).
pub fn vllm_python() -> PathBuf {
    if let Some(p) = std::env::var_os("KVTIER_VLLM_PYTHON") {
        return p.into();
    }
    let out = Command::new(repo().join("scripts/vllm-venv")).output().expect("run scripts/vllm-venv");
    assert!(out.status.success(), "scripts/vllm-venv failed: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim()).join("bin/python")
}

/// A command running `tests/e2e/run_vllm.py` with `args`, the connector on the Python path, in a
/// process group of its own (see [`kill_group`]).
pub fn run_vllm(python: &Path, args: &[&str]) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(python);
    cmd.arg(repo().join("tests/e2e/run_vllm.py")).args(args);
    cmd.env("PYTHONPATH", repo().join("client/python")).env("HF_HUB_OFFLINE", "1");
    cmd.process_group(0);
    cmd
}

/// SIGKILLs the process group led by `child` (vLLM's engine and worker processes with it), so
/// nothing outlives a test holding its output pipes.
pub fn kill_group(child: &Child) {
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGKILL);
}

/// Runs `cmd` (made by [`run_vllm`]) to its end with stdout and stderr in files under `dir`, then
/// kills whatever its process group left behind. Returns (success, stdout, stderr).
pub fn run_to_end(mut cmd: Command, dir: &Path) -> (bool, String, String) {
    let (out, err) = (dir.join("vllm.stdout"), dir.join("vllm.stderr"));
    // vLLM's ZeroMQ sockets go here, not into /tmp, where nothing would remove them.
    cmd.env("VLLM_RPC_BASE_PATH", dir);
    cmd.stdout(std::fs::File::create(&out).unwrap()).stderr(std::fs::File::create(&err).unwrap());
    let mut child = cmd.spawn().expect("spawn vLLM");
    let status = child.wait().expect("wait for vLLM");
    kill_group(&child);
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    (status.success(), read(&out), read(&err))
}

/// Builds the tiny random-weight model of `tests/e2e/make_model.py` in `dir` (extra `args` size it).
pub fn make_model(python: &Path, dir: &Path, args: &[&str]) {
    let out = Command::new(python).arg(repo().join("tests/e2e/make_model.py")).arg(dir).args(args).output().unwrap();
    assert!(out.status.success(), "make_model.py failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// The JSON of the `RESULT ` line `run_vllm.py` prints, if any.
pub fn result_line(stdout: &str) -> Option<serde_json::Value> {
    stdout.lines().find_map(|l| l.strip_prefix("RESULT ")).map(|j| serde_json::from_str(j).expect("RESULT json"))
}

/// A small ext4 filesystem in an image file, loop-mounted: real disk-full and I/O-error faults.
/// Needs root (the CI machine runs tests as root); unmounted on drop.
pub struct LoopFs {
    _dir: tempfile::TempDir,
    /// Where the filesystem is mounted.
    pub mount: PathBuf,
}

impl LoopFs {
    /// Makes and mounts an ext4 filesystem of `mib` MiB.
    pub fn new(mib: u64) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let image = dir.path().join("fs.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        std::fs::File::create(&image).unwrap().set_len(mib << 20).unwrap();
        let run = |cmd: &mut Command| {
            let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
            assert!(
                out.status.success(),
                "{cmd:?} failed (loop mounts need root): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
        run(Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&mount));
        Self { _dir: dir, mount }
    }

    /// Makes every later I/O on the filesystem fail with EIO (ext4's shutdown ioctl, as the
    /// kernel's own filesystem tests do to simulate a dying disk).
    pub fn shut_down(&self) {
        const EXT4_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587d; // _IOR('X', 125, __u32)
        const EXT4_GOING_FLAGS_NOLOGFLUSH: u32 = 2;
        let dir = std::fs::File::open(&self.mount).unwrap();
        let flags = EXT4_GOING_FLAGS_NOLOGFLUSH;
        // SAFETY: the ioctl reads one u32 from the pointer.
        let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&dir), EXT4_IOC_SHUTDOWN, &flags) };
        assert_eq!(rc, 0, "EXT4_IOC_SHUTDOWN: {}", std::io::Error::last_os_error());
    }

    /// Fills the filesystem with a file until it is full.
    pub fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.mount.join("filler")).unwrap();
        for size in [1 << 20, 4096] {
            let chunk = vec![0xa5u8; size];
            while f.write_all(&chunk).is_ok() {}
        }
        let _ = f.sync_all();
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

impl Daemon {
    /// Process id of the running daemon.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Resident memory of the daemon in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

/// A TCP relay between a client and `upstream` whose connections a test can cut at will (the
/// listener stays up, so the client can reconnect through it).
pub struct TcpProxy {
    /// Address clients connect to.
    pub addr: String,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl TcpProxy {
    /// Starts relaying to `upstream`.
    pub fn start(upstream: &str) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().unwrap().to_string();
        let conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>> = Default::default();
        let (up, kept) = (upstream.to_string(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(&up) else { continue };
                let mut keep = kept.lock().unwrap();
                keep.push(client.try_clone().unwrap());
                keep.push(server.try_clone().unwrap());
                drop(keep);
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Self { addr, conns }
    }

    /// Cuts every connection relayed so far.
    pub fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A running `kvtier router`, killed on drop.
pub struct RouterProc {
    child: Child,
    /// Its RouterService address.
    pub addr: String,
    /// Its metrics address.
    pub metrics: String,
}

impl RouterProc {
    /// Starts `kvtier router` following `daemons` (feed addresses) and whatever `extra` flags
    /// add (e.g. `--dns`).
    pub fn start(daemons: &[&str], extra: &[&str]) -> Self {
        let (addr, metrics) = (free_local_addr(), free_local_addr());
        let mut cmd = Command::new(bin("kvtier"));
        cmd.args(["router", "--listen", &addr, "--metrics-listen", &metrics]);
        for d in daemons {
            cmd.args(["--daemon", d]);
        }
        let log = std::env::var("KVTIER_ROUTER_LOG")
            .ok()
            .and_then(|p| std::fs::File::create(format!("{p}.{}", addr.replace(':', "_"))).ok());
        let stderr = log.map_or_else(Stdio::null, Stdio::from);
        cmd.env("RUST_LOG", "debug");
        let child = cmd.args(extra).stdout(Stdio::null()).stderr(stderr).spawn().expect("spawn kvtier router");
        eventually("the router accepts", || std::net::TcpStream::connect(&addr).is_ok());
        Self { child, addr, metrics }
    }

    /// Value of an unlabelled metric of the router (0 if absent).
    pub fn metric(&self, name: &str) -> f64 {
        let out = http_get(&self.metrics, "/metrics").expect("router metrics");
        let prefix = format!("{name} ");
        out.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
    }
}

impl Drop for RouterProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA and a certificate it signed for the name `kvtierd` (client and server use), as PEM
/// files in a temporary directory.
pub struct Pki {
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out =
        Command::new("openssl").args(args).current_dir(dir).output().expect("openssl (scripts/packages installs it)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Pki {
    /// Makes CAs and certificates named by `pairs` of (CA, certificate).
    pub fn new(pairs: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        for (ca, cert) in pairs {
            if !d.join(format!("{ca}.pem")).exists() {
                let (key, pem, subject) = (format!("{ca}.key"), format!("{ca}.pem"), format!("/CN={ca}"));
                openssl(
                    d,
                    &[&["req", "-x509"], &ec[..], &["-keyout", &key, "-out", &pem, "-days", "2", "-subj", &subject]]
                        .concat(),
                );
            }
            let ext = format!("{cert}.ext");
            std::fs::write(
                d.join(&ext),
                "subjectAltName=DNS:kvtierd\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n",
            )
            .unwrap();
            let (key, csr, pem) = (format!("{cert}.key"), format!("{cert}.csr"), format!("{cert}.pem"));
            openssl(d, &[&["req"], &ec[..], &["-keyout", &key, "-out", &csr, "-subj", "/CN=kvtierd"]].concat());
            let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
            let sign =
                ["x509", "-req", "-in", &csr, "-CA", &ca_pem, "-CAkey", &ca_key, "-CAcreateserial", "-out", &pem];
            openssl(d, &[&sign[..], &["-days", "2", "-extfile", &ext]].concat());
        }
        Self { dir }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    pub fn arg(&self, file: &str) -> String {
        self.path(file).display().to_string()
    }

    /// Daemon flags serving with certificate `cert` of CA `ca`.
    pub fn daemon_flags(&self, ca: &str, cert: &str) -> Vec<String> {
        let (c, k, a) =
            (self.arg(&format!("{cert}.pem")), self.arg(&format!("{cert}.key")), self.arg(&format!("{ca}.pem")));
        ["--grpc-tls-cert", &c, "--grpc-tls-key", &k, "--grpc-tls-ca", &a].map(String::from).to_vec()
    }

    /// Puts certificate `cert` of CA `ca` in `dir` as `tls.crt`, `tls.key` and `ca.crt` the way
    /// a secret volume is updated: each written aside, then renamed over the old one.
    pub fn install(&self, dir: &Path, ca: &str, cert: &str) {
        for (from, to) in
            [(format!("{cert}.pem"), "tls.crt"), (format!("{cert}.key"), "tls.key"), (format!("{ca}.pem"), "ca.crt")]
        {
            let aside = dir.join(format!(".{to}.new"));
            std::fs::copy(self.path(&from), &aside).unwrap();
            std::fs::rename(&aside, dir.join(to)).unwrap();
        }
    }
}

/// One metric family of a Prometheus exposition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Family {
    /// Its `# TYPE` (counter, gauge, histogram).
    pub kind: String,
    /// Its `# HELP` text.
    pub help: String,
    /// Label names seen on its samples.
    pub labels: std::collections::BTreeSet<String>,
}

/// The metric families of Prometheus text, by name (a histogram's `_bucket`, `_sum` and
/// `_count` samples count as its own).
pub fn metric_families(text: &str) -> std::collections::BTreeMap<String, Family> {
    let mut out: std::collections::BTreeMap<String, Family> = Default::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            out.entry(name.into()).or_default().kind = kind.into();
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            out.entry(name.into()).or_default().help = help.into();
        } else if !line.starts_with('#') && !line.is_empty() {
            let name_end = line.find(['{', ' ']).unwrap();
            let mut name = &line[..name_end];
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(base) =
                    name.strip_suffix(suffix).filter(|b| out.get(*b).is_some_and(|f| f.kind == "histogram"))
                {
                    name = base;
                }
            }
            if let Some(labels) = line[name_end..].strip_prefix('{').and_then(|l| l.split_once('}')).map(|l| l.0) {
                let entry = out.entry(name.into()).or_default();
                entry.labels.extend(labels.split(',').filter_map(|kv| kv.split_once('=')).map(|kv| kv.0.to_string()));
            }
        }
    }
    out
}

/// Runs a future to completion from synchronous code inside a multi-threaded tokio test.
pub fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// A long-running `kvtier` subcommand (`gateway`, `picker`), killed when dropped. Its log
/// (RUST_LOG=info) is kept in a temporary file, shown by [`KvtierProc::log`].
pub struct KvtierProc {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl KvtierProc {
    /// Starts `kvtier ARGS` and waits until `addr` accepts connections.
    pub fn start(args: &[&str], addr: &str) -> Self {
        let log = tempfile::NamedTempFile::new().expect("log file");
        let stderr = Stdio::from(log.reopen().expect("log file"));
        let child = Command::new(bin("kvtier"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn kvtier");
        let mut p = Self { child, log };
        eventually("kvtier accepts", || {
            assert!(p.child.try_wait().ok().flatten().is_none(), "kvtier {args:?} exited:\n{}", p.log());
            std::net::TcpStream::connect(addr).is_ok()
        });
        p
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Stops it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for KvtierProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A vLLM OpenAI server (`python -m vllm.entrypoints.openai.api_server`, CPU build) serving
/// `model` as "tiny" with the kvtier connector on `daemon` (announcing its address), in its own
/// process group, killed with it when dropped.
pub struct VllmServer {
    child: Child,
    /// Where it serves, `127.0.0.1:PORT`.
    pub addr: String,
    dir: tempfile::TempDir,
}

impl VllmServer {
    /// Starts it with the connector on `daemon` (with `extra` flags); see
    /// [`wait_ready`](Self::wait_ready).
    pub fn start(py: &Path, model: &Path, daemon: &Daemon, extra: &[&str]) -> Self {
        Self::start_with(py, model, Some(daemon), extra)
    }

    /// Starts it, with the connector on `daemon` or without a connector (None); `extra` flags
    /// come last (a repeated flag overrides the defaults, e.g. `--dtype`).
    pub fn start_with(py: &Path, model: &Path, daemon: Option<&Daemon>, extra: &[&str]) -> Self {
        use std::os::unix::process::CommandExt;
        let addr = free_local_addr();
        let port = addr.rsplit(':').next().unwrap().to_string();
        let dir = tempfile::tempdir().unwrap();
        let kv = daemon.map(|d| {
            let config = serde_json::json!({
                "kv_connector": "KvTierConnector",
                "kv_connector_module_path": "kvtier.vllm",
                "kv_role": "kv_both",
                "kv_connector_extra_config": {"socket": d.socket, "engine_address": addr},
            });
            vec!["--kv-transfer-config".to_string(), config.to_string()]
        });
        #[rustfmt::skip]
        let child = Command::new(py)
            .args(["-m", "vllm.entrypoints.openai.api_server", "--model", model.to_str().unwrap(),
                   "--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "2048",
                   "--enforce-eager", "--seed", "0", "--host", "127.0.0.1", "--port", &port,
                   "--trust-request-chat-template", "--enable-scale-out", "--enable-prompt-tokens-details"])
            .args(kv.unwrap_or_default())
            .args(extra)
            .env("PYTHONPATH", repo().join("client/python"))
            .env("HF_HUB_OFFLINE", "1")
            .env("VLLM_CPU_KVCACHE_SPACE", "1")
            .env("VLLM_RPC_BASE_PATH", dir.path())
            // vLLM's CPU build reserves one more core for any KV connector (meant for NIXL), which
            // changes the worker's OpenMP threads (N-2 rather than N-1; on 2 cores, 2 rather
            // than 1, as nothing is left to reserve) and with them bf16 sums (docs/vllm.md,
            // "Exactness"): keep the reservation vLLM makes without a connector either way.
            .env("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
            .stdout(std::fs::File::create(dir.path().join("stdout")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
            .process_group(0)
            .spawn()
            .expect("spawn the vLLM OpenAI server");
        Self { child, addr, dir }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// Waits until it answers `/health` (panics with its log if it exits or takes 10 min).
    pub fn wait_ready(&mut self) {
        let started = Instant::now();
        while http_get(&self.addr, "/health").is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("vLLM exited ({status}):\n{}", self.log());
            }
            assert!(started.elapsed() < Duration::from_secs(600), "vLLM not ready in 10 min:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Kills it and everything it started.
    pub fn kill(&mut self) {
        kill_group(&self.child);
        let _ = self.child.wait();
    }
}

impl Drop for VllmServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `cmd` with `input` on its stdin; its stdout and stderr captured.
pub fn output_with_input(cmd: &mut Command, input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    child.stdin.take().expect("stdin").write_all(input).expect("write stdin");
    child.wait_with_output().expect("wait")
}
