//! The peer tier's mechanism: one thread owns this daemon's UCX context and worker, with every
//! pool segment registered, keeps the worker progressing (peers read our pool by RMA; over
//! emulated transports that needs our progress), and runs pulls: many RMA GETs from a peer's pool
//! straight into reserved slots of ours.

use crate::config::PeerConfig;
use crate::pool::HostPool;
use kvtier_ucx::{Context, Endpoint, Region, RemoteKey, Worker};
use std::collections::HashMap;
use std::sync::mpsc;
use std::time::Duration;
use tokio::sync::oneshot;

/// One range to read: (local address, bytes, remote address, index of the remote segment's key).
pub type ReadOp = (usize, usize, u64, usize);

enum Cmd {
    Pull { worker: Vec<u8>, rkeys: Vec<Vec<u8>>, ops: Vec<ReadOp>, done: oneshot::Sender<Result<(), String>> },
}

/// What peers need to read this daemon's pool.
#[derive(Clone, Debug)]
pub struct Exposure {
    /// This daemon's UCX worker address.
    pub worker_address: Vec<u8>,
    /// Per pool segment: its address here and its packed remote key.
    pub segments: Vec<(u64, Vec<u8>)>,
}

/// Handle to the UCX thread.
pub struct Peer {
    tx: mpsc::Sender<Cmd>,
    exposure: Exposure,
}

impl Peer {
    /// Starts the UCX thread with `cfg`'s transports and registers `pool`.
    pub fn start(cfg: &PeerConfig, pool: &HostPool) -> anyhow::Result<Peer> {
        let mut settings: Vec<(String, String)> = Vec::new();
        if !cfg.tls.is_empty() {
            settings.push(("TLS".into(), cfg.tls.clone()));
        }
        if !cfg.net_devices.is_empty() {
            settings.push(("NET_DEVICES".into(), cfg.net_devices.clone()));
        }
        let segments: Vec<(usize, usize)> =
            pool.segments().iter().map(|s| (s.as_ptr() as usize, s.len() as usize)).collect();
        let detect = !cfg.tls.contains("shm");
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("kvtier-ucx".into())
            .spawn(move || run(settings, segments, detect, rx, ready_tx))?;
        let exposure = ready_rx.recv().map_err(|_| anyhow::anyhow!("UCX thread died at start"))??;
        Ok(Peer { tx, exposure })
    }

    /// What peers need to read this daemon's pool.
    pub fn exposure(&self) -> &Exposure {
        &self.exposure
    }

    /// Reads `ops` from the peer whose worker address is `worker`, with its segments' `rkeys`.
    pub async fn pull(&self, worker: Vec<u8>, rkeys: Vec<Vec<u8>>, ops: Vec<ReadOp>) -> Result<(), String> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Cmd::Pull { worker, rkeys, ops, done }).map_err(|_| "UCX thread stopped".to_string())?;
        rx.await.map_err(|_| "UCX thread stopped".to_string())?
    }
}

type Ready = anyhow::Result<Exposure>;

fn run(
    settings: Vec<(String, String)>,
    segments: Vec<(usize, usize)>,
    detect_peer_failure: bool,
    rx: mpsc::Receiver<Cmd>,
    ready: mpsc::Sender<Ready>,
) {
    let setup = || -> anyhow::Result<(std::sync::Arc<Context>, Worker, Vec<Region>)> {
        let pairs: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let ctx = Context::new(&pairs)?;
        let worker = Worker::new(&ctx)?;
        // SAFETY: the pool's segments stay mapped for the daemon's life (the Node owns the pool
        // and outlives this thread's work).
        let regions =
            segments.iter().map(|&(p, l)| unsafe { Region::map(&ctx, p as *mut u8, l) }).collect::<Result<_, _>>()?;
        Ok((ctx, worker, regions))
    };
    let (_ctx, worker, regions) = match setup() {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let exposure = (|| -> anyhow::Result<Exposure> {
        let segments = regions.iter().map(|r| Ok((r.address(), r.pack_rkey()?))).collect::<anyhow::Result<_>>()?;
        Ok(Exposure { worker_address: worker.address()?, segments })
    })();
    let failed = exposure.is_err();
    let _ = ready.send(exposure);
    if failed {
        return;
    }
    let mut endpoints: HashMap<Vec<u8>, Endpoint> = HashMap::new();
    loop {
        match rx.try_recv() {
            Ok(Cmd::Pull { worker: peer, rkeys, ops, done }) => {
                let result = pull(&worker, &mut endpoints, peer, &rkeys, &ops, detect_peer_failure);
                let _ = done.send(result);
            }
            Err(mpsc::TryRecvError::Empty) => {
                if worker.progress() == 0 {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            Err(mpsc::TryRecvError::Disconnected) => break,
        }
    }
    drop(endpoints);
    drop(regions);
}

fn pull(
    worker: &Worker,
    endpoints: &mut HashMap<Vec<u8>, Endpoint>,
    peer: Vec<u8>,
    rkeys: &[Vec<u8>],
    ops: &[ReadOp],
    detect_peer_failure: bool,
) -> Result<(), String> {
    if !endpoints.contains_key(&peer) {
        let ep = worker.connect(&peer, detect_peer_failure).map_err(|e| e.to_string())?;
        endpoints.insert(peer.clone(), ep);
    }
    let ep = &endpoints[&peer];
    let keys =
        rkeys.iter().map(|k| RemoteKey::unpack(ep, k)).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
    let result = {
        let mut batch = Vec::with_capacity(ops.len());
        for &(local, len, remote, seg) in ops {
            let key = keys.get(seg).ok_or_else(|| format!("segment {seg} has no remote key"))?;
            batch.push((local, len, remote, key));
        }
        // SAFETY: the caller reserved the local slots for this pull; nobody else writes them.
        unsafe { ep.get_many(&batch, &[worker]) }
    };
    drop(keys);
    if let Err(e) = result {
        // A failed endpoint is not reused.
        endpoints.remove(&peer);
        return Err(e.to_string());
    }
    Ok(())
}
