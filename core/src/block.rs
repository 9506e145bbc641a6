//! Small value types shared by the index, the policies and the allocator.

use std::fmt;

/// Longest block hash accepted, in bytes (a sha256 digest).
pub const MAX_HASH_BYTES: usize = kvtier_proto::MAX_HASH_BYTES;

/// An engine block hash (the chained prefix hash of one block), stored inline.
///
/// ```
/// use kvtier_core::block::BlockHash;
/// let h = BlockHash::new(b"abc").unwrap();
/// assert_eq!(h.as_bytes(), b"abc");
/// assert!(BlockHash::new(&[0u8; 33]).is_none());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash {
    len: u8,
    bytes: [u8; MAX_HASH_BYTES],
}

impl BlockHash {
    /// Wraps 1 to 32 bytes; `None` for an empty or longer slice.
    pub fn new(bytes: &[u8]) -> Option<Self> {
        if bytes.is_empty() || bytes.len() > MAX_HASH_BYTES {
            return None;
        }
        let mut b = [0u8; MAX_HASH_BYTES];
        b[..bytes.len()].copy_from_slice(bytes);
        Some(Self { len: bytes.len() as u8, bytes: b })
    }

    /// A hash made from an integer id (little-endian), as trace simulations use.
    pub fn from_u64(id: u64) -> Self {
        Self::new(&id.to_le_bytes()).expect("8 bytes is a valid hash")
    }

    /// The hash bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.as_bytes() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Daemon-local index of a registered namespace (dense, small).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct NsIdx(pub u16);

/// Key of a block in the index: its namespace and its hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct BlockKey {
    /// Namespace the block belongs to.
    pub ns: NsIdx,
    /// The engine's block hash.
    pub hash: BlockHash,
}

/// Stable handle of an index entry, valid until the entry is removed.
///
/// Policies keep their per-block state in arrays indexed by handle.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct Handle(pub u32);

impl Handle {
    /// The handle as an array index.
    pub fn idx(self) -> usize {
        self.0 as usize
    }
}

/// Identifies one slot of the host pool: a slab and a slot within it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct SlotId {
    /// Slab number, counted over all pool segments.
    pub slab: u32,
    /// Slot number within the slab.
    pub slot: u32,
}

impl SlotId {
    /// "No slot": the block has no copy in this tier.
    pub const NONE: SlotId = SlotId { slab: u32::MAX, slot: u32::MAX };

    /// True unless this is [`SlotId::NONE`].
    pub fn is_some(self) -> bool {
        self != Self::NONE
    }

    /// True for [`SlotId::NONE`].
    pub fn is_none(self) -> bool {
        self == Self::NONE
    }
}

/// Where a held block can be served from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TierKind {
    /// In the host pool, ready to be acquired.
    Host,
    /// Only on disk: promoted into the pool before it is served.
    Disk,
}
