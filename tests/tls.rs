//! Mutual TLS on the gRPC plane with real certificates (made by `openssl` for the test): a
//! router holding the cluster's certificate follows a daemon; clients without a certificate,
//! with one from another CA, or in plain text are refused; the local unix socket stays plain;
//! two daemons pull blocks from each other over it; a router can serve behind it too;
//! certificates replaced on disk are served, and dialed with, without a restart.

use bytes::Bytes;
use kvtier_client::testdata;
use kvtier_proto::v1 as pb;
use kvtier_proto::v1::cache_service_client::CacheServiceClient;
use kvtier_proto::v1::router_service_client::RouterServiceClient;
use kvtier_proto::v1::transfer_service_client::TransferServiceClient;
use kvtier_router::feed::{channel, channel_with};
use kvtier_tests::{eventually_within, namespace, Daemon, Pki, RouterProc};
use std::path::Path;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The client side of a test PKI as tonic takes it.
trait ClientSide {
    /// The client side with `cert` (None: no client certificate), trusting `ca`.
    fn client(&self, ca: &str, cert: Option<&str>) -> ClientTlsConfig;
}

impl ClientSide for Pki {
    fn client(&self, ca: &str, cert: Option<&str>) -> ClientTlsConfig {
        let read = |f: String| std::fs::read(self.path(&f)).unwrap();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(format!("{ca}.pem"))))
            .domain_name("kvtierd");
        match cert {
            Some(c) => tls.identity(Identity::from_pem(read(format!("{c}.pem")), read(format!("{c}.key")))),
            None => tls,
        }
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Saves prompt `seed` of `n` 16 KiB blocks on `d` (over the connector socket, untouched by TLS).
async fn save(d: &Daemon, seed: u64, n: usize) -> (Bytes, Vec<Bytes>) {
    let mut c = d.client("tls-test").await;
    let ns = c.register(namespace("tls-test", 16384)).await.unwrap();
    let hashes = testdata::chained_hashes(seed, n);
    let blocks: Vec<Vec<u8>> = hashes.iter().map(|h| testdata::block(h, 16384)).collect();
    c.save(&ns, &hashes, &blocks.iter().map(|b| &b[..]).collect::<Vec<_>>()).await.unwrap();
    (ns.id.clone(), hashes)
}

/// The daemon's own Lookup of the prompt over `channel`.
async fn lookup(channel: tonic::transport::Channel, ns: &Bytes, hashes: &[Bytes]) -> Result<u32, tonic::Status> {
    let q = pb::PrefixQuery { namespace_id: ns.clone(), hashes: hashes.to_vec() };
    let reply = CacheServiceClient::new(channel).lookup(pb::BatchLookupRequest { queries: vec![q] }).await?;
    Ok(reply.into_inner().matches[0].matched)
}

/// Whether a Lookup over TCP with `tls` (None: plain text) is served.
async fn served(d: &Daemon, tls: Option<&ClientTlsConfig>, ns: &Bytes, hashes: &[Bytes]) -> bool {
    match channel_with(&d.grpc, tls).await {
        Ok(ch) => lookup(ch, ns, hashes).await.is_ok(),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_clients_with_the_clusters_certificate_are_served_and_routers_follow_over_tls() {
    let pki = Pki::new(&[("ca", "node"), ("ca", "router"), ("rogue-ca", "rogue")]);
    let d = Daemon::start(&strs(&pki.daemon_flags("ca", "node")));
    assert!(d.log().contains("(mutual TLS)"), "{}", d.log());
    let (ns, hashes) = save(&d, 1, 12).await;

    assert!(served(&d, Some(&pki.client("ca", Some("router"))), &ns, &hashes).await, "the cluster's certificate");
    // Clients that connect and never start their handshake hold up no other.
    let silent: Vec<_> = (0..8).map(|_| std::net::TcpStream::connect(&d.grpc).unwrap()).collect();
    let cluster = pki.client("ca", Some("router"));
    let beside = served(&d, Some(&cluster), &ns, &hashes);
    let beside = tokio::time::timeout(std::time::Duration::from_secs(5), beside).await;
    assert_eq!(beside.ok(), Some(true), "served within 5 s beside silent clients (a handshake takes up to 10 s)");
    drop(silent);
    assert!(!served(&d, None, &ns, &hashes).await, "plain text");
    assert!(!served(&d, Some(&pki.client("ca", None)), &ns, &hashes).await, "no client certificate");
    assert!(!served(&d, Some(&pki.client("ca", Some("rogue"))), &ns, &hashes).await, "another CA's certificate");
    assert!(!served(&d, Some(&pki.client("rogue-ca", Some("router"))), &ns, &hashes).await, "server not trusted");
    let local = channel(&format!("unix:{}", d.dir.path().join("grpc.sock").display())).await.unwrap();
    assert_eq!(lookup(local, &ns, &hashes).await.unwrap(), 12, "the unix socket stays plain");

    let router_tls =
        ["--tls-cert", &pki.arg("router.pem"), "--tls-key", &pki.arg("router.key"), "--tls-ca", &pki.arg("ca.pem")];
    let r = RouterProc::start(&[&d.grpc], &router_tls);
    let plain = RouterProc::start(&[&d.grpc], &[]);
    // Blocks of the prompt a router's Route finds, asked with `tls` (None: plain text); None if
    // the router did not answer.
    let route = |r: &RouterProc, tls: Option<ClientTlsConfig>| {
        let (addr, ns, hashes) = (r.addr.clone(), ns.clone(), hashes.clone());
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async move {
                let ch = channel_with(&addr, tls.as_ref()).await.ok()?;
                let reply = RouterServiceClient::new(ch).route(pb::RouteRequest { namespace_id: ns, hashes }).await;
                reply.ok().map(|r| r.into_inner().matched_blocks)
            })
        })
    };
    eventually_within("the TLS router follows the daemon", 20, || route(&r, None) == Some(12));
    assert_eq!(route(&plain, None), Some(0), "a router without the certificate learns nothing");

    // A router serving RouterService behind mutual TLS too: callers need the CA's certificate.
    let served_router = RouterProc::start(&[&d.grpc], &[&router_tls[..], &["--serve-tls"]].concat());
    eventually_within("the TLS-served router answers callers with a certificate", 20, || {
        route(&served_router, Some(pki.client("ca", Some("node")))) == Some(12)
    });
    assert_eq!(route(&served_router, None), None, "plain text refused");
    assert_eq!(route(&served_router, Some(pki.client("ca", Some("rogue")))), None, "another CA's certificate refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_pull_from_each_other_over_mutual_tls() {
    let pki = Pki::new(&[("ca", "a"), ("ca", "b")]);
    let peer =
        ["--pool-bytes", "64 MiB", "--slab-bytes", "4 MiB", "--transfer", "--ucx-transports", "tcp"].map(String::from);
    let a = Daemon::start(&strs(&[&peer[..], &pki.daemon_flags("ca", "a")].concat()));
    let b = Daemon::start(&strs(&[&peer[..], &pki.daemon_flags("ca", "b")].concat()));
    let (ns, hashes) = save(&a, 2, 64).await;
    let mut local = b.client("tls-test").await;
    let ns_b = local.register(namespace("tls-test", 16384)).await.unwrap();
    let mut c = TransferServiceClient::new(channel_with(&b.grpc, Some(&pki.client("ca", Some("a")))).await.unwrap());
    let req = pb::PullRequest { source: a.grpc.clone(), namespace_id: ns.clone(), hashes: hashes.clone() };
    assert_eq!(c.pull(req).await.unwrap().into_inner().pulled, 64);
    // Byte-exact on the puller, over its connector socket.
    let mut loaded = 0;
    local
        .load(&ns_b, &hashes, |i, bytes| {
            assert_eq!(bytes, &testdata::block(&hashes[i], 16384)[..]);
            loaded += 1;
        })
        .await
        .unwrap();
    assert_eq!(loaded, 64);
}

/// Daemon flags reading the certificate files `Pki::install` puts in `dir`.
fn live_flags(dir: &Path) -> Vec<String> {
    let f = |name: &str| dir.join(name).display().to_string();
    vec![
        "--grpc-tls-cert".into(),
        f("tls.crt"),
        "--grpc-tls-key".into(),
        f("tls.key"),
        "--grpc-tls-ca".into(),
        f("ca.crt"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_replaced_on_disk_are_served_and_dialed_with_without_a_restart() {
    let pki = Pki::new(&[
        ("ca", "a"),
        ("ca", "b"),
        ("ca", "client"),
        ("new-ca", "new-a"),
        ("new-ca", "new-b"),
        ("new-ca", "new-client"),
    ]);
    let (live_a, live_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    pki.install(live_a.path(), "ca", "a");
    pki.install(live_b.path(), "ca", "b");
    // Earlier releases' flag names, still accepted (aliases of --transfer and --ucx-transports).
    let peer = ["--pool-bytes", "64 MiB", "--slab-bytes", "4 MiB", "--peer", "--peer-tls", "tcp"].map(String::from);
    let mut a = Daemon::start(&strs(&[&peer[..], &live_flags(live_a.path())].concat()));
    let b = Daemon::start(&strs(&[&peer[..], &live_flags(live_b.path())].concat()));
    let (old, new) = (pki.client("ca", Some("client")), pki.client("new-ca", Some("new-client")));
    let (ns, hashes) = save(&a, 3, 8).await;
    let mut on_b = b.client("tls-test").await;
    on_b.register(namespace("tls-test", 16384)).await.unwrap();
    assert!(served(&a, Some(&old), &ns, &hashes).await, "the first certificate");
    // B pulls from A once, so that it holds a channel to A made with the first certificates.
    let source = a.grpc.clone(); // kept across restarts
    let pull = |hashes: Vec<Bytes>, tls: ClientTlsConfig| {
        let (b, source, ns) = (b.grpc.clone(), source.clone(), ns.clone());
        async move {
            let mut c = TransferServiceClient::new(channel_with(&b, Some(&tls)).await.unwrap());
            let req = pb::PullRequest { source, namespace_id: ns, hashes };
            c.pull(req).await.map(|r| r.into_inner())
        }
    };
    assert_eq!(pull(hashes.clone(), old.clone()).await.unwrap().pulled, 8);

    // The cluster moves to a new CA: both daemons' files are replaced, neither is restarted.
    let pid = a.pid();
    pki.install(live_a.path(), "new-ca", "new-a");
    pki.install(live_b.path(), "new-ca", "new-b");
    assert!(served(&a, Some(&new), &ns, &hashes).await, "the new certificate, without a restart");
    assert!(!served(&a, Some(&old), &ns, &hashes).await, "the old CA's certificate is refused now");
    assert_eq!(a.pid(), pid);
    assert!(a.log().contains("the files changed; new connections use them"), "{}", a.log());

    // A certificate replaced by something that does not load (its key not written yet, or a
    // botched copy): the last good files stay in use.
    std::fs::write(live_a.path().join("tls.crt"), "not a certificate").unwrap();
    assert!(served(&a, Some(&new), &ns, &hashes).await, "still served with the last good files");
    assert!(a.log().contains("do not load"), "{}", a.log());
    pki.install(live_a.path(), "new-ca", "new-a");

    // A restarted with the new files: B's old channel to it cannot reconnect with the old
    // certificates, so B must dial with the new ones.
    a.restart();
    let (_, again) = save(&a, 4, 8).await;
    let pulled = pull(again, new.clone()).await.expect("B dials A with the new certificates");
    assert_eq!(pulled.pulled, 8);
}

#[test]
fn a_daemon_given_files_that_are_not_certificates_does_not_start() {
    let pki = Pki::new(&[("ca", "node")]);
    let live = tempfile::tempdir().unwrap();
    pki.install(live.path(), "ca", "node");
    std::fs::write(live.path().join("tls.crt"), "not a certificate").unwrap();
    let socket = live.path().join("kvtierd.sock");
    let out = std::process::Command::new(kvtier_tests::bin("kvtierd"))
        .args(["--socket", socket.to_str().unwrap(), "--allow-unlocked", "--pool-bytes", "8 MiB"])
        .args(["--slab-bytes", "1 MiB", "--metrics-listen", "", "--grpc-listen", "127.0.0.1:0"])
        .args(live_flags(live.path()))
        .env_remove("KVTIER_CONFIG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("grpc.tls.cert"), "{stderr}");
}
