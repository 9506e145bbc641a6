//! The persistent index of one spill file, in redb: which block sits in which slot.
//!
//! An entry is written only after its slot's write completed, in a durable transaction, so after
//! a crash the index may lack the newest blocks (they are simply not recovered) but never points
//! at a slot that was not written. A slot reused before its old entry was removed is caught by
//! the header check on promote (hash, namespace, checksum); at recovery the newer generation wins.

use anyhow::Context;
use kvtier_core::block::BlockHash;
use kvtier_core::namespace::NamespaceId;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;

/// File name of the index inside the spill directory.
pub const INDEX_FILE: &str = "kvtier.redb";

const BLOCKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blocks");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const META_UUID: &str = "spill_uuid";
const META_GENERATION: &str = "generation_floor";

/// Generations handed out by one daemon run never reach the next run's floor.
const GENERATIONS_PER_RUN: u64 = 1 << 40;

/// One block as recorded in the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredBlock {
    /// Namespace of the block.
    pub namespace: NamespaceId,
    /// The block's hash.
    pub hash: BlockHash,
    /// Slab within this spill file.
    pub slab: u32,
    /// Slot within the slab.
    pub slot: u32,
    /// Bytes of the block.
    pub block_bytes: u64,
    /// Generation written in the slot header.
    pub generation: u64,
    /// Checksum of the block's bytes.
    pub checksum: u64,
}

/// One change to apply, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreOp {
    /// Record a block in its slot.
    Put(StoredBlock),
    /// Forget the block `(namespace, hash)` if it is still recorded in `(slab, slot)`.
    Delete {
        /// Namespace of the block.
        namespace: NamespaceId,
        /// The block's hash.
        hash: BlockHash,
        /// Slab of the removed copy.
        slab: u32,
        /// Slot of the removed copy.
        slot: u32,
    },
}

fn key_of(namespace: &NamespaceId, hash: &BlockHash) -> Vec<u8> {
    let mut k = Vec::with_capacity(16 + hash.as_bytes().len());
    k.extend_from_slice(&namespace.0);
    k.extend_from_slice(hash.as_bytes());
    k
}

fn value_of(b: &StoredBlock) -> [u8; 32] {
    let mut v = [0u8; 32];
    v[0..4].copy_from_slice(&b.slab.to_le_bytes());
    v[4..8].copy_from_slice(&b.slot.to_le_bytes());
    v[8..16].copy_from_slice(&b.block_bytes.to_le_bytes());
    v[16..24].copy_from_slice(&b.generation.to_le_bytes());
    v[24..32].copy_from_slice(&b.checksum.to_le_bytes());
    v
}

/// The block an index entry records (None: an entry that does not decode, skipped at recovery).
pub fn decode(key: &[u8], v: &[u8]) -> Option<StoredBlock> {
    if key.len() <= 16 || v.len() != 32 {
        return None;
    }
    let u32_at = |i: usize| u32::from_le_bytes(v[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(v[i..i + 8].try_into().expect("8 bytes"));
    Some(StoredBlock {
        namespace: NamespaceId(key[..16].try_into().expect("16 bytes")),
        hash: BlockHash::new(&key[16..])?,
        slab: u32_at(0),
        slot: u32_at(4),
        block_bytes: u64_at(8),
        generation: u64_at(16),
        checksum: u64_at(24),
    })
}

/// The index of one spill file.
pub struct Store {
    db: Database,
}

/// What opening an index found.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// The index belongs to this spill file.
    Matching,
    /// The index was empty or belonged to another spill file, and was cleared.
    Reset,
}

impl Store {
    /// Opens (or creates) `dir/kvtier.redb` for the spill file with `uuid`. An index recorded
    /// for another file is cleared. Returns the store, what was found, and this run's floor for
    /// write generations.
    pub fn open(dir: &Path, uuid: [u8; 16]) -> anyhow::Result<(Store, Opened, u64)> {
        let path = dir.join(INDEX_FILE);
        let db = Database::create(&path).with_context(|| format!("opening disk index {}", path.display()))?;
        let txn = db.begin_write()?;
        let (opened, floor) = {
            let mut meta = txn.open_table(META)?;
            let known = meta.get(META_UUID)?.map(|v| v.value().to_vec());
            let floor =
                meta.get(META_GENERATION)?.and_then(|v| v.value().try_into().ok().map(u64::from_le_bytes)).unwrap_or(0)
                    + GENERATIONS_PER_RUN;
            meta.insert(META_GENERATION, floor.to_le_bytes().as_slice())?;
            let opened = if known.as_deref() == Some(&uuid[..]) { Opened::Matching } else { Opened::Reset };
            if opened == Opened::Reset {
                meta.insert(META_UUID, uuid.as_slice())?;
            }
            (opened, floor)
        };
        if opened == Opened::Reset {
            txn.delete_table(BLOCKS)?;
        }
        txn.open_table(BLOCKS)?;
        txn.commit()?;
        Ok((Store { db }, opened, floor))
    }

    /// Every recorded block; entries that do not decode are skipped.
    pub fn load(&self) -> anyhow::Result<Vec<StoredBlock>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(BLOCKS)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (k, v) = item?;
            if let Some(b) = decode(k.value(), v.value()) {
                out.push(b);
            }
        }
        Ok(out)
    }

    /// Applies `ops` in order in one durable transaction.
    pub fn apply(&self, ops: &[StoreOp]) -> anyhow::Result<()> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut table = txn.open_table(BLOCKS)?;
            for op in ops {
                match op {
                    StoreOp::Put(b) => {
                        table.insert(key_of(&b.namespace, &b.hash).as_slice(), value_of(b).as_slice())?;
                    }
                    StoreOp::Delete { namespace, hash, slab, slot } => {
                        let key = key_of(namespace, hash);
                        let current = table.get(key.as_slice())?.and_then(|v| decode(&key, v.value()));
                        if current.is_some_and(|b| b.slab == *slab && b.slot == *slot) {
                            table.remove(key.as_slice())?;
                        }
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(id: u64, slot: u32, generation: u64) -> StoredBlock {
        StoredBlock {
            namespace: NamespaceId([1; 16]),
            hash: BlockHash::from_u64(id),
            slab: 0,
            slot,
            block_bytes: 4096,
            generation,
            checksum: id * 3,
        }
    }

    #[test]
    fn puts_and_deletes_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let (s, opened, floor) = Store::open(dir.path(), [1; 16]).unwrap();
        assert_eq!(opened, Opened::Reset);
        let delete =
            |b: StoredBlock| StoreOp::Delete { namespace: b.namespace, hash: b.hash, slab: b.slab, slot: b.slot };
        s.apply(&[StoreOp::Put(block(1, 0, 1)), StoreOp::Put(block(2, 1, 2)), delete(block(1, 0, 1))]).unwrap();
        // A delete of a copy that has since moved leaves the newer record alone.
        s.apply(&[StoreOp::Put(block(2, 5, 3)), delete(block(2, 1, 2))]).unwrap();
        drop(s);
        let (s, opened, floor2) = Store::open(dir.path(), [1; 16]).unwrap();
        assert_eq!(opened, Opened::Matching);
        assert!(floor2 > floor, "generations never repeat across runs");
        assert_eq!(s.load().unwrap(), vec![block(2, 5, 3)]);
    }

    #[test]
    fn an_index_of_another_spill_file_is_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _, _) = Store::open(dir.path(), [1; 16]).unwrap();
        s.apply(&[StoreOp::Put(block(1, 0, 1))]).unwrap();
        drop(s);
        let (s, opened, _) = Store::open(dir.path(), [2; 16]).unwrap();
        assert_eq!(opened, Opened::Reset);
        assert!(s.load().unwrap().is_empty());
    }
}
