//! Who is connected to the connector socket, for the admin view (`kvtier clients`): each
//! connection's task keeps its own record up to date; the registry lists the live ones.

use kvtier_core::block::NsIdx;
use kvtier_core::cache::ClientId;
use kvtier_proto::v1 as pb;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One connection as the admin view shows it.
#[derive(Debug)]
pub struct Connection {
    /// Owner id of the connection's reservations and pins.
    pub client: ClientId,
    /// The connected process (SO_PEERCRED).
    pub pid: Option<i32>,
    /// Its uid (SO_PEERCRED).
    pub uid: u32,
    /// When it connected.
    pub since: Instant,
    name: Mutex<String>,
    namespaces: Mutex<Vec<NsIdx>>,
    kv_caches: AtomicU32,
    requests: AtomicU64,
    engine: Mutex<Option<pb::NodeEngine>>,
}

/// What a connection has done so far (a consistent copy of its counters).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Activity {
    /// The name it gave in Hello (empty before).
    pub name: String,
    /// Namespaces it registered, in order.
    pub namespaces: Vec<NsIdx>,
    /// KV caches it registered for daemon-side copies.
    pub kv_caches: u32,
    /// Requests it sent.
    pub requests: u64,
}

impl Connection {
    /// Records the name from Hello (its first 256 characters: it is the client's to choose).
    pub fn named(&self, name: &str) {
        *self.name.lock().unwrap_or_else(|e| e.into_inner()) = name.chars().take(256).collect();
    }

    /// Records a namespace registration (once per namespace).
    pub fn registered(&self, ns: NsIdx) {
        let mut v = self.namespaces.lock().unwrap_or_else(|e| e.into_inner());
        if !v.contains(&ns) {
            v.push(ns);
        }
    }

    /// Records the engine the connection speaks for (from Hello, validated by the caller).
    pub fn announced(&self, engine: pb::EngineInfo) {
        let node_engine = pb::NodeEngine { engine: Some(engine), namespaces: Vec::new() };
        *self.engine.lock().unwrap_or_else(|e| e.into_inner()) = Some(node_engine);
    }

    /// Records a namespace an engine connection registered, with its salt cleared (once per
    /// descriptor; the per-connection namespace quota bounds them).
    pub fn registered_descriptor(&self, desc: &pb::NamespaceDescriptor) {
        let mut engine = self.engine.lock().unwrap_or_else(|e| e.into_inner());
        let Some(e) = engine.as_mut() else { return };
        let cleared = pb::NamespaceDescriptor { cache_salt: String::new(), ..desc.clone() };
        if !e.namespaces.contains(&cleared) {
            e.namespaces.push(cleared);
        }
    }

    /// The engine it speaks for and the namespaces that engine registered, if it announced one.
    pub fn engine(&self) -> Option<pb::NodeEngine> {
        self.engine.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records a KV cache registered for daemon-side copies.
    pub fn registered_kv_cache(&self) {
        self.kv_caches.fetch_add(1, Relaxed);
    }

    /// Counts a request.
    pub fn requested(&self) {
        self.requests.fetch_add(1, Relaxed);
    }

    /// Its activity so far.
    pub fn activity(&self) -> Activity {
        Activity {
            name: self.name.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            namespaces: self.namespaces.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            kv_caches: self.kv_caches.load(Relaxed),
            requests: self.requests.load(Relaxed),
        }
    }
}

/// How many connections may be open at once.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// In all.
    pub total: usize,
    /// Of one uid.
    pub per_uid: usize,
}

impl ConnectionLimits {
    /// No limit (tests).
    pub const NONE: Self = Self { total: usize::MAX, per_uid: usize::MAX };
}

/// The live connections, by client id.
#[derive(Default)]
pub struct Connections {
    live: Mutex<BTreeMap<u64, Arc<Connection>>>,
}

/// A connection's place in the registry: dropping it (the connection ended) removes it.
pub struct Registered<'a> {
    registry: &'a Connections,
    /// The connection's record.
    pub record: Arc<Connection>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.registry.live.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.record.client.0);
    }
}

impl Connections {
    /// Adds a new connection; it stays listed while the returned value lives. Refused (with the
    /// reason) when `limits` are reached.
    pub fn open(
        &self,
        client: ClientId,
        pid: Option<i32>,
        uid: u32,
        limits: ConnectionLimits,
    ) -> Result<Registered<'_>, String> {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.len() >= limits.total {
            return Err(format!("{} connections are open (server.max_connections)", live.len()));
        }
        let of_uid = live.values().filter(|c| c.uid == uid).count();
        if of_uid >= limits.per_uid {
            return Err(format!("uid {uid} has {of_uid} connections open (server.max_connections_per_uid)"));
        }
        let record = Arc::new(Connection {
            client,
            pid,
            uid,
            since: Instant::now(),
            name: Mutex::default(),
            namespaces: Mutex::default(),
            kv_caches: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            engine: Mutex::default(),
        });
        live.insert(client.0, Arc::clone(&record));
        Ok(Registered { registry: self, record })
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// True when nobody is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The live connections, oldest first.
    pub fn list(&self) -> Vec<Arc<Connection>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// The engines connected now, oldest connection first.
    pub fn engines(&self) -> Vec<pb::NodeEngine> {
        self.list().iter().filter_map(|c| c.engine()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engines_are_listed_with_their_namespaces_salt_cleared_while_connected() {
        let reg = Connections::default();
        let plain = reg.open(ClientId(1), None, 0, ConnectionLimits::NONE).unwrap();
        let desc =
            |salt: &str| pb::NamespaceDescriptor { model: "m".into(), cache_salt: salt.into(), ..Default::default() };
        plain.record.registered_descriptor(&desc("a"));
        assert!(reg.engines().is_empty(), "a connection that announced no engine is not one");
        let engine = reg.open(ClientId(2), None, 0, ConnectionLimits::NONE).unwrap();
        let info = pb::EngineInfo { address: "10.0.0.1:8000".into(), served_models: vec!["m".into()] };
        engine.record.announced(info.clone());
        for salt in ["", "tenant-a", "tenant-b"] {
            engine.record.registered_descriptor(&desc(salt));
        }
        let engines = reg.engines();
        assert_eq!(engines.len(), 1);
        assert_eq!(engines[0].engine.as_ref(), Some(&info));
        assert_eq!(engines[0].namespaces, vec![desc("")], "salts are the tenants' own: never reported");
        drop(engine);
        assert!(reg.engines().is_empty());
    }

    #[test]
    fn connections_are_listed_while_open_with_their_activity() {
        let reg = Connections::default();
        let a = reg.open(ClientId(7), Some(100), 0, ConnectionLimits::NONE).unwrap();
        {
            let b = reg.open(ClientId(3), None, 4242, ConnectionLimits::NONE).unwrap();
            b.record.named(&"e".repeat(1000));
            assert_eq!(b.record.activity().name.len(), 256);
            let ids: Vec<u64> = reg.list().iter().map(|c| c.client.0).collect();
            assert_eq!(ids, [3, 7]);
        }
        assert_eq!(reg.list().len(), 1, "a closed connection leaves the list");
        a.record.named("vllm");
        a.record.registered(NsIdx(2));
        a.record.registered(NsIdx(2));
        a.record.registered(NsIdx(0));
        a.record.registered_kv_cache();
        a.record.requested();
        a.record.requested();
        let want = Activity { name: "vllm".into(), namespaces: vec![NsIdx(2), NsIdx(0)], kv_caches: 1, requests: 2 };
        assert_eq!(reg.list()[0].activity(), want);
    }

    #[test]
    fn connections_are_limited_in_all_and_per_uid() {
        let reg = Connections::default();
        let limits = ConnectionLimits { total: 3, per_uid: 2 };
        let a = reg.open(ClientId(1), None, 7, limits).unwrap();
        let _b = reg.open(ClientId(2), None, 7, limits).unwrap();
        let err = reg.open(ClientId(3), None, 7, limits).err().unwrap();
        assert!(err.contains("uid 7 has 2") && err.contains("max_connections_per_uid"), "{err}");
        let _c = reg.open(ClientId(4), None, 8, limits).unwrap();
        assert!(reg.open(ClientId(5), None, 9, limits).err().unwrap().contains("3 connections are open"));
        drop(a);
        assert!(reg.open(ClientId(6), None, 7, limits).is_ok(), "a closed connection frees its place");
    }
}
