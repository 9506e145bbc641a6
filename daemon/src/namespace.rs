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
    /// Derives the id from every descriptor field except `block_bytes`.
    ///
    /// ```
    /// use kvtier_daemon::namespace::NamespaceId;
    /// use kvtier_proto::v1::NamespaceDescriptor;
    /// let a = NamespaceDescriptor { model: "m".into(), cache_salt: "tenant-a".into(), ..Default::default() };
    /// let b = NamespaceDescriptor { cache_salt: "tenant-b".into(), ..a.clone() };
    /// assert_ne!(NamespaceId::of(&a), NamespaceId::of(&b));
    /// ```
    pub fn of(desc: &NamespaceDescriptor) -> Self {
        let canonical = NamespaceDescriptor { block_bytes: 0, ..desc.clone() }.encode_to_vec();
        let digest = Sha256::new_with_prefix(b"kvtier.namespace.v1\0").chain_update(&canonical).finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        Self(id)
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
}

/// The namespaces known to the daemon, by dense index.
#[derive(Default)]
pub struct NamespaceTable {
    infos: Vec<NamespaceInfo>,
    by_id: HashMap<NamespaceId, NsIdx>,
}

impl NamespaceTable {
    /// The index of `id`, if known.
    pub fn find(&self, id: &NamespaceId) -> Option<NsIdx> {
        self.by_id.get(id).copied()
    }

    /// Adds a namespace; the caller guarantees `info.id` is new.
    pub fn add(&mut self, info: NamespaceInfo) -> NsIdx {
        let idx = NsIdx(self.infos.len() as u16);
        self.by_id.insert(info.id, idx);
        self.infos.push(info);
        idx
    }

    /// Info of a known namespace.
    pub fn get(&self, idx: NsIdx) -> &NamespaceInfo {
        &self.infos[idx.0 as usize]
    }

    /// Number of namespaces.
    pub fn len(&self) -> usize {
        self.infos.len()
    }

    /// True when no namespace is known.
    pub fn is_empty(&self) -> bool {
        self.infos.is_empty()
    }
}
