//! Namespaces: the identity of interchangeable KV blocks, and the daemon's table of known ones.

use crate::block::NsIdx;
use kvtier_proto::v1::NamespaceDescriptor;
use prost::Message;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt;

/// Stable 16-byte id of a namespace: the same descriptor gives the same id on every node.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespaceId(pub [u8; 16]);

impl NamespaceId {
    /// Derives the id from every descriptor field, `block_bytes` included: a registration with
    /// another block size is another namespace, so the first client to name a descriptor cannot
    /// lock others out of it with a wrong size.
    ///
    /// ```
    /// use kvtier_core::namespace::NamespaceId;
    /// use kvtier_proto::v1::NamespaceDescriptor;
    /// let a = NamespaceDescriptor { model: "m".into(), cache_salt: "tenant-a".into(), block_bytes: 4096, ..Default::default() };
    /// let b = NamespaceDescriptor { cache_salt: "tenant-b".into(), ..a.clone() };
    /// let c = NamespaceDescriptor { block_bytes: 8192, ..a.clone() };
    /// assert_ne!(NamespaceId::of(&a), NamespaceId::of(&b));
    /// assert_ne!(NamespaceId::of(&a), NamespaceId::of(&c));
    /// ```
    pub fn of(desc: &NamespaceDescriptor) -> Self {
        let canonical = desc.encode_to_vec();
        let digest = Sha256::new_with_prefix(b"kvtier.namespace.v2\0").chain_update(&canonical).finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        Self(id)
    }

    /// The first 4 bytes in hex: how Stats, Clients and metrics name a namespace.
    ///
    /// ```
    /// use kvtier_core::namespace::NamespaceId;
    /// assert_eq!(NamespaceId([0xab; 16]).short(), "abababab");
    /// ```
    pub fn short(&self) -> String {
        self.0[..4].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 16 bytes from the wire.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        Some(Self(b.try_into().ok()?))
    }
}

impl fmt::Debug for NamespaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// What the daemon knows of a registered namespace.
#[derive(Clone, Debug)]
pub struct NamespaceInfo {
    /// Stable id.
    pub id: NamespaceId,
    /// Bytes of one block.
    pub block_bytes: u64,
    /// Distance between slots (block_bytes aligned up).
    pub stride: u64,
    /// Live connections that registered it (it is never reclaimed while one does).
    pub attached: u32,
    /// Index entries (reserved or committed, in any tier) of its blocks.
    pub entries: u64,
    /// When it was last used, in [`NamespaceTable::tick`]s.
    pub last_used: u64,
}

impl NamespaceInfo {
    /// A namespace nobody has registered or used yet.
    pub fn new(id: NamespaceId, block_bytes: u64, stride: u64) -> Self {
        Self { id, block_bytes, stride, attached: 0, entries: 0, last_used: 0 }
    }
}

/// The namespaces known to the daemon, by dense index. Indices of reclaimed namespaces are
/// reused; a reclaimed index keeps its last info until then.
#[derive(Default)]
pub struct NamespaceTable {
    infos: Vec<NamespaceInfo>,
    live: Vec<bool>,
    by_id: HashMap<NamespaceId, NsIdx>,
    free: Vec<NsIdx>,
    clock: u64,
}

impl NamespaceTable {
    /// The index of `id`, if known.
    pub fn find(&self, id: &NamespaceId) -> Option<NsIdx> {
        self.by_id.get(id).copied()
    }

    /// Adds a namespace (the caller guarantees `info.id` is new), reusing a reclaimed index if
    /// there is one.
    pub fn add(&mut self, mut info: NamespaceInfo) -> NsIdx {
        info.last_used = self.tick();
        let idx = match self.free.pop() {
            Some(idx) => {
                self.infos[idx.0 as usize] = info;
                self.live[idx.0 as usize] = true;
                idx
            }
            None => {
                self.infos.push(info);
                self.live.push(true);
                NsIdx(self.infos.len() as u16 - 1)
            }
        };
        self.by_id.insert(self.infos[idx.0 as usize].id, idx);
        idx
    }

    /// Forgets a namespace; its index goes to the next [`add`](Self::add).
    pub fn remove(&mut self, idx: NsIdx) {
        if std::mem::replace(&mut self.live[idx.0 as usize], false) {
            self.by_id.remove(&self.infos[idx.0 as usize].id);
            self.free.push(idx);
        }
    }

    /// Info of a known namespace.
    pub fn get(&self, idx: NsIdx) -> &NamespaceInfo {
        &self.infos[idx.0 as usize]
    }

    /// Mutable info of a known namespace.
    pub fn get_mut(&mut self, idx: NsIdx) -> &mut NamespaceInfo {
        &mut self.infos[idx.0 as usize]
    }

    /// Whether `idx` names a namespace now (not reclaimed).
    pub fn is_live(&self, idx: NsIdx) -> bool {
        self.live.get(idx.0 as usize).copied().unwrap_or(false)
    }

    /// The live namespaces, by index.
    pub fn live(&self) -> impl Iterator<Item = NsIdx> + '_ {
        (0..self.infos.len()).filter(|&i| self.live[i]).map(|i| NsIdx(i as u16))
    }

    /// Number of live namespaces.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// True when no namespace is known.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// One past the largest index ever used: per-namespace arrays must cover it.
    pub fn bound(&self) -> usize {
        self.infos.len()
    }

    /// Advances the use clock and returns its new value.
    pub fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Marks `idx` used now.
    pub fn touch(&mut self, idx: NsIdx) {
        let now = self.tick();
        self.infos[idx.0 as usize].last_used = now;
    }

    /// A live namespace that no connection has registered and that holds no block: free to
    /// reclaim at no cost.
    pub fn empty_detached(&self) -> Option<NsIdx> {
        self.live().find(|&i| self.get(i).attached == 0 && self.get(i).entries == 0)
    }

    /// Live namespaces no connection has registered, least recently used first: the ones to
    /// empty when the table is full.
    pub fn detached_by_age(&self) -> Vec<NsIdx> {
        let mut v: Vec<NsIdx> = self.live().filter(|&i| self.get(i).attached == 0).collect();
        v.sort_by_key(|&i| self.get(i).last_used);
        v
    }
}

/// What a client said of a namespace when it registered it: how operators name it (namespaces
/// restored from disk have none until a client registers them again). Never shown in full:
/// Stats and metrics show the model only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Naming {
    /// The descriptor's model.
    pub model: String,
    /// The descriptor's tenant salt.
    pub cache_salt: String,
}

/// Which namespaces an operator's request names: all of them, or those matching every
/// criterion given of a model name, a tenant's cache salt and an id prefix.
#[derive(Clone, PartialEq, Eq)]
pub enum NamespaceSelector {
    /// Every namespace.
    All,
    /// Namespaces matching every criterion given (at least one is).
    Matching {
        /// The model name they were registered with.
        model: Option<String>,
        /// The tenant salt they were registered with.
        cache_salt: Option<String>,
        /// Leading bytes of their id.
        id_prefix: Option<Vec<u8>>,
    },
}

impl std::fmt::Debug for NamespaceSelector {
    /// Salts are secrets of sorts (they keep tenants apart): logs show whether one was given.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => write!(f, "all"),
            Self::Matching { model, cache_salt, id_prefix } => f
                .debug_struct("Matching")
                .field("model", model)
                .field("cache_salt", &cache_salt.as_ref().map(|_| "<given>"))
                .field(
                    "id_prefix",
                    &id_prefix.as_ref().map(|p| p.iter().map(|b| format!("{b:02x}")).collect::<String>()),
                )
                .finish(),
        }
    }
}

impl NamespaceSelector {
    /// Builds a selector from the wire's fields (empty means not given); refuses one that
    /// selects nothing by accident or mixes `all` with criteria.
    ///
    /// ```
    /// use kvtier_core::namespace::NamespaceSelector;
    /// assert!(NamespaceSelector::new("", "", &[], false).is_err());
    /// assert_eq!(NamespaceSelector::new("", "", &[], true), Ok(NamespaceSelector::All));
    /// ```
    pub fn new(model: &str, cache_salt: &str, id_prefix: &[u8], all: bool) -> Result<Self, String> {
        let given = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let (model, cache_salt) = (given(model), given(cache_salt));
        let id_prefix = (!id_prefix.is_empty()).then(|| id_prefix.to_vec());
        if let Some(p) = id_prefix.as_ref().filter(|p| p.len() > 16) {
            return Err(format!("an id prefix has at most 16 bytes, not {}", p.len()));
        }
        match (all, model.is_some() || cache_salt.is_some() || id_prefix.is_some()) {
            (true, true) => Err("select all namespaces or some by model, salt or id, not both".into()),
            (true, false) => Ok(Self::All),
            (false, false) => Err("select namespaces: all, or by model, cache salt and/or id prefix".into()),
            (false, true) => Ok(Self::Matching { model, cache_salt, id_prefix }),
        }
    }

    /// Whether the namespace `id`, registered as `naming` (None: not since the daemon started),
    /// is selected.
    pub fn selects(&self, naming: Option<&Naming>, id: &NamespaceId) -> bool {
        match self {
            Self::All => true,
            Self::Matching { model, cache_salt, id_prefix } => {
                model.as_ref().is_none_or(|m| naming.is_some_and(|n| &n.model == m))
                    && cache_salt.as_ref().is_none_or(|s| naming.is_some_and(|n| &n.cache_salt == s))
                    && id_prefix.as_ref().is_none_or(|p| id.0.starts_with(p))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(model: &str, cache_salt: &str) -> Naming {
        Naming { model: model.into(), cache_salt: cache_salt.into() }
    }

    #[test]
    fn selectors_match_every_criterion_given() {
        let id = NamespaceId([0xab, 0xcd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        let by = |model: &str, salt: &str, prefix: &[u8]| NamespaceSelector::new(model, salt, prefix, false).unwrap();
        let (llama, llama_a, qwen_a) = (named("llama", ""), named("llama", "tenant-a"), named("qwen", "tenant-a"));
        assert!(by("llama", "", &[]).selects(Some(&llama), &id));
        assert!(!by("llama", "", &[]).selects(Some(&qwen_a), &id));
        assert!(!by("llama", "", &[]).selects(None, &id), "a namespace restored from disk has no model yet");
        assert!(
            by("", "tenant-a", &[]).selects(Some(&llama_a), &id) && by("", "tenant-a", &[]).selects(Some(&qwen_a), &id)
        );
        assert!(!by("", "tenant-a", &[]).selects(Some(&llama), &id));
        assert!(!by("", "tenant-a", &[]).selects(None, &id));
        assert!(by("llama", "tenant-a", &[]).selects(Some(&llama_a), &id));
        assert!(!by("llama", "tenant-a", &[]).selects(Some(&qwen_a), &id), "both must match");
        assert!(by("", "", &[0xab]).selects(None, &id));
        assert!(by("", "", &id.0).selects(Some(&qwen_a), &id), "a whole id is a prefix");
        assert!(!by("", "", &[0xab, 0xce]).selects(Some(&qwen_a), &id));
        assert!(!by("llama", "", &[0xab, 0xcd]).selects(Some(&qwen_a), &id));
        assert!(NamespaceSelector::All.selects(None, &id));
    }

    #[test]
    fn reclaimed_indices_are_reused_and_forgotten_ids_are_not_found() {
        let mut t = NamespaceTable::default();
        let a = t.add(NamespaceInfo::new(NamespaceId([1; 16]), 4096, 4096));
        let b = t.add(NamespaceInfo::new(NamespaceId([2; 16]), 4096, 4096));
        t.get_mut(a).attached = 1;
        t.get_mut(b).entries = 3;
        assert_eq!(t.empty_detached(), None, "a is registered, b holds blocks");
        t.get_mut(b).entries = 0;
        assert_eq!(t.empty_detached(), Some(b));
        t.remove(b);
        t.remove(b);
        assert_eq!((t.len(), t.bound(), t.find(&NamespaceId([2; 16]))), (1, 2, None));
        let c = t.add(NamespaceInfo::new(NamespaceId([3; 16]), 8192, 8192));
        assert_eq!(c, b, "the index is reused");
        assert_eq!((t.get(c).block_bytes, t.find(&NamespaceId([3; 16]))), (8192, Some(c)));
        t.touch(c);
        let d = t.add(NamespaceInfo::new(NamespaceId([4; 16]), 4096, 4096));
        t.touch(d);
        t.touch(c);
        assert_eq!(t.detached_by_age(), vec![d, c], "least recently used first; a is registered");
        assert_eq!(t.live().collect::<Vec<_>>(), vec![a, c, d]);
    }

    #[test]
    fn selectors_refuse_ambiguous_requests_and_keep_salts_out_of_logs() {
        assert!(NamespaceSelector::new("", "", &[], false).is_err(), "nothing selected is not everything");
        assert!(NamespaceSelector::new("m", "", &[], true).is_err());
        assert!(NamespaceSelector::new("", "s", &[], true).is_err());
        assert!(NamespaceSelector::new("", "", &[1], true).is_err());
        assert!(NamespaceSelector::new("", "", &[0; 17], false).is_err());
        let logged = format!("{:?}", NamespaceSelector::new("m", "secret-salt", &[0xab], false).unwrap());
        assert!(!logged.contains("secret") && logged.contains("<given>") && logged.contains("ab"), "{logged}");
    }
}
