//! On-disk formats: the spill file's superblock and the header in front of every block.
//!
//! Both are little-endian, fixed-offset, versioned and checksummed (xxh3-64), so a slot can be
//! judged on its own: a torn write, a corrupt sector or a slot reused by another block fails
//! [`SlotHeader::verify`] and is never served. See `docs/disk-format.md`.

use kvtier_core::block::BlockHash;
use kvtier_core::namespace::NamespaceId;
use xxhash_rust::xxh3::xxh3_64;

/// Bytes reserved for the superblock at the start of a spill file, and for each slot header.
pub const HEADER_BYTES: u64 = 4096;

const SLOT_MAGIC: &[u8; 8] = b"KVTSLOT1";
const SPILL_MAGIC: &[u8; 8] = b"KVTSPIL1";
const FORMAT_VERSION: u32 = 1;

/// Why a header or superblock was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Not our magic number (never written, or overwritten).
    #[error("bad magic")]
    BadMagic,
    /// Written by another format version.
    #[error("format version {0}, expected {FORMAT_VERSION}")]
    Version(u32),
    /// The header's own checksum does not match (torn or corrupt).
    #[error("header checksum mismatch")]
    HeaderChecksum,
    /// A field is out of range.
    #[error("bad field: {0}")]
    BadField(&'static str),
    /// Fewer bytes than a header holds.
    #[error("{0} bytes: shorter than a header")]
    Short(usize),
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

/// Checks magic, version and the checksum stored at `sum_at` over `buf[..sum_at]`.
fn check_envelope(buf: &[u8], magic: &[u8; 8], sum_at: usize) -> Result<(), FormatError> {
    if buf.len() < sum_at + 8 {
        return Err(FormatError::Short(buf.len()));
    }
    if &buf[..8] != magic {
        return Err(FormatError::BadMagic);
    }
    if xxh3_64(&buf[..sum_at]) != u64_at(buf, sum_at) {
        return Err(FormatError::HeaderChecksum);
    }
    match u32_at(buf, 8) {
        FORMAT_VERSION => Ok(()),
        v => Err(FormatError::Version(v)),
    }
}

/// The self-description written in front of each block on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotHeader {
    /// Namespace of the block.
    pub namespace: NamespaceId,
    /// The block's hash.
    pub hash: BlockHash,
    /// Bytes of the block (the payload after the header).
    pub block_bytes: u64,
    /// Write generation: increases with every write, across restarts.
    pub generation: u64,
    /// xxh3-64 of the payload.
    pub checksum: u64,
}

const SLOT_SUM_AT: usize = 88;

impl SlotHeader {
    /// Writes the header into the first bytes of `buf` (at least 96 bytes); the rest is untouched.
    pub fn encode_into(&self, buf: &mut [u8]) {
        buf[..SLOT_SUM_AT + 8].fill(0);
        put(buf, 0, SLOT_MAGIC);
        put(buf, 8, &FORMAT_VERSION.to_le_bytes());
        let hash = self.hash.as_bytes();
        put(buf, 12, &(hash.len() as u32).to_le_bytes());
        put(buf, 16, &self.namespace.0);
        put(buf, 32, hash);
        put(buf, 64, &self.block_bytes.to_le_bytes());
        put(buf, 72, &self.generation.to_le_bytes());
        put(buf, 80, &self.checksum.to_le_bytes());
        let sum = xxh3_64(&buf[..SLOT_SUM_AT]);
        put(buf, SLOT_SUM_AT, &sum.to_le_bytes());
    }

    /// Reads a header written by [`encode_into`](Self::encode_into).
    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        check_envelope(buf, SLOT_MAGIC, SLOT_SUM_AT)?;
        let len = u32_at(buf, 12) as usize;
        let hash = BlockHash::new(buf.get(32..32 + len).ok_or(FormatError::BadField("hash length"))?)
            .ok_or(FormatError::BadField("hash length"))?;
        Ok(Self {
            namespace: NamespaceId(buf[16..32].try_into().expect("16 bytes")),
            hash,
            block_bytes: u64_at(buf, 64),
            generation: u64_at(buf, 72),
            checksum: u64_at(buf, 80),
        })
    }

    /// Checksum of a block's bytes as stored in headers.
    pub fn checksum_of(payload: &[u8]) -> u64 {
        xxh3_64(payload)
    }

    /// Whether `slot` (header followed by payload, as read from disk) holds exactly the block
    /// `(namespace, hash)` of `block_bytes` bytes, intact.
    pub fn verify(
        slot: &[u8],
        header_bytes: usize,
        namespace: &NamespaceId,
        hash: &BlockHash,
        block_bytes: u64,
    ) -> bool {
        let Ok(h) = Self::decode(slot) else { return false };
        let end = usize::try_from(block_bytes).ok().and_then(|b| b.checked_add(header_bytes));
        let Some(payload) = end.and_then(|end| slot.get(header_bytes..end)) else { return false };
        h.namespace == *namespace
            && h.hash == *hash
            && h.block_bytes == block_bytes
            && h.checksum == Self::checksum_of(payload)
    }
}

/// The first [`HEADER_BYTES`] of a spill file: which file this is and how it is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Random identity, also recorded in the persistent index: an index only trusts its own file.
    pub uuid: [u8; 16],
    /// Bytes per slab (as the pool's slabs).
    pub slab_bytes: u64,
    /// Slabs in the file after the superblock.
    pub slabs: u64,
    /// Bytes of each slot header.
    pub header_bytes: u64,
}

const SPILL_SUM_AT: usize = 56;

impl Superblock {
    /// Writes the superblock into the first bytes of `buf`.
    pub fn encode_into(&self, buf: &mut [u8]) {
        buf[..SPILL_SUM_AT + 8].fill(0);
        put(buf, 0, SPILL_MAGIC);
        put(buf, 8, &FORMAT_VERSION.to_le_bytes());
        put(buf, 16, &self.uuid);
        put(buf, 32, &self.slab_bytes.to_le_bytes());
        put(buf, 40, &self.slabs.to_le_bytes());
        put(buf, 48, &self.header_bytes.to_le_bytes());
        let sum = xxh3_64(&buf[..SPILL_SUM_AT]);
        put(buf, SPILL_SUM_AT, &sum.to_le_bytes());
    }

    /// Reads a superblock written by [`encode_into`](Self::encode_into).
    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        check_envelope(buf, SPILL_MAGIC, SPILL_SUM_AT)?;
        Ok(Self {
            uuid: buf[16..32].try_into().expect("16 bytes"),
            slab_bytes: u64_at(buf, 32),
            slabs: u64_at(buf, 40),
            header_bytes: u64_at(buf, 48),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> SlotHeader {
        SlotHeader {
            namespace: NamespaceId([3; 16]),
            hash: BlockHash::new(&[7; 32]).unwrap(),
            block_bytes: 8192,
            generation: 42,
            checksum: SlotHeader::checksum_of(&[5u8; 8192]),
        }
    }

    fn slot() -> Vec<u8> {
        let mut s = vec![5u8; 4096 + 8192];
        header().encode_into(&mut s);
        s
    }

    #[test]
    fn header_round_trips() {
        assert_eq!(SlotHeader::decode(&slot()), Ok(header()));
    }

    #[test]
    fn an_intact_slot_verifies() {
        let h = header();
        assert!(SlotHeader::verify(&slot(), 4096, &h.namespace, &h.hash, 8192));
    }

    #[test]
    fn any_flipped_payload_byte_fails_verification() {
        let h = header();
        for at in [4096, 4096 + 4095, 4096 + 8191] {
            let mut s = slot();
            s[at] ^= 1;
            assert!(!SlotHeader::verify(&s, 4096, &h.namespace, &h.hash, 8192), "byte {at}");
        }
    }

    #[test]
    fn a_stale_or_foreign_slot_fails_verification() {
        let h = header();
        let other = BlockHash::new(&[8; 32]).unwrap();
        assert!(!SlotHeader::verify(&slot(), 4096, &h.namespace, &other, 8192));
        assert!(!SlotHeader::verify(&slot(), 4096, &NamespaceId([4; 16]), &h.hash, 8192));
        assert!(!SlotHeader::verify(&slot(), 4096, &h.namespace, &h.hash, 4096));
    }

    #[test]
    fn torn_or_garbage_headers_are_rejected() {
        let mut s = slot();
        s[70] ^= 0x80;
        assert_eq!(SlotHeader::decode(&s), Err(FormatError::HeaderChecksum));
        assert_eq!(SlotHeader::decode(&[0u8; 4096]), Err(FormatError::BadMagic));
        let mut s = slot();
        s[12] = 200;
        let sum = xxh3_64(&s[..SLOT_SUM_AT]);
        s[SLOT_SUM_AT..SLOT_SUM_AT + 8].copy_from_slice(&sum.to_le_bytes());
        assert!(matches!(SlotHeader::decode(&s), Err(FormatError::BadField(_))));
    }

    #[test]
    fn superblock_round_trips_and_rejects_versions() {
        let sb = Superblock { uuid: [9; 16], slab_bytes: 1 << 24, slabs: 12, header_bytes: 4096 };
        let mut buf = vec![0u8; 4096];
        sb.encode_into(&mut buf);
        assert_eq!(Superblock::decode(&buf), Ok(sb));
        buf[8] = 2;
        let sum = xxh3_64(&buf[..SPILL_SUM_AT]);
        buf[SPILL_SUM_AT..SPILL_SUM_AT + 8].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(Superblock::decode(&buf), Err(FormatError::Version(2)));
        assert_eq!(Superblock::decode(&slot()), Err(FormatError::BadMagic));
    }

    #[test]
    fn short_buffers_are_refused_not_panicked_on() {
        // Found by fuzz/disk_recovery: decoding fewer bytes than a header indexed past the end.
        for len in [0, 7, 8, 63, SLOT_SUM_AT + 7] {
            assert_eq!(SlotHeader::decode(&slot()[..len]), Err(FormatError::Short(len)));
            assert!(!SlotHeader::verify(
                &slot()[..len],
                HEADER_BYTES as usize,
                &NamespaceId([3; 16]),
                &header().hash,
                1
            ));
        }
        assert_eq!(Superblock::decode(&[0u8; SPILL_SUM_AT + 7]), Err(FormatError::Short(SPILL_SUM_AT + 7)));
    }
}
