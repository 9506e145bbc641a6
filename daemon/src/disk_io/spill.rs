//! A spill file: preallocated, opened O_DIRECT, a superblock and then equal slabs of slots.

use super::format::{Superblock, HEADER_BYTES};
use anyhow::{bail, Context};
use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// File name of the spill file inside its directory.
pub const SPILL_FILE: &str = "kvtier.spill";

/// How an existing spill file was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// Its superblock matches the configuration: its slots may be served.
    Reused,
    /// Same layout, another size: slots past the new end are gone.
    Resized {
        /// Slabs before.
        from: u64,
    },
    /// Started empty; the reason is logged (new file, or an incompatible old one).
    Fresh(String),
}

/// An open spill file.
pub struct SpillFile {
    /// The file, opened O_RDWR | O_DIRECT.
    pub file: File,
    /// Where it lives.
    pub path: PathBuf,
    /// Its superblock as now written.
    pub superblock: Superblock,
}

/// A 4 KiB-aligned buffer for the few O_DIRECT transfers done outside the ring.
struct AlignedPage(Box<Page>);

#[repr(C, align(4096))]
struct Page([u8; HEADER_BYTES as usize]);

impl AlignedPage {
    fn zeroed() -> Self {
        Self(Box::new(Page([0; HEADER_BYTES as usize])))
    }
}

fn random_uuid() -> anyhow::Result<[u8; 16]> {
    let mut uuid = [0u8; 16];
    File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut uuid)).context("reading /dev/urandom")?;
    Ok(uuid)
}

/// Bytes free to unprivileged writers on the filesystem holding `file`.
fn free_bytes(file: &File) -> u64 {
    nix::sys::statvfs::fstatvfs(file).map_or(0, |s| s.blocks_available().saturating_mul(s.fragment_size()))
}

/// Allocates `bytes` for the spill file, all or nothing: a failed `fallocate` may have taken
/// part of the space, which is handed back (a new file removed, an old one cut back to
/// `old_len`), so the filesystem is as full as before and the message tells what was free.
fn preallocate(file: &File, path: &Path, bytes: u64, created: bool, old_len: u64) -> anyhow::Result<()> {
    let free_before = free_bytes(file);
    let Err(err) = fallocate(file, FallocateFlags::empty(), 0, bytes as i64) else { return Ok(()) };
    let undo = match created {
        true => std::fs::remove_file(path),
        false => file.set_len(old_len),
    };
    if let Err(e) = undo {
        tracing::error!("could not hand back the space of {} after a failed preallocation: {e}", path.display());
    }
    match err {
        Errno::ENOSPC => bail!(
            "disk full: cannot preallocate {} for {} ({} free on that filesystem); lower disk.bytes_per_dir",
            bytesize::ByteSize(bytes),
            path.display(),
            bytesize::ByteSize(free_before)
        ),
        e => Err(e).with_context(|| format!("fallocate {} bytes for {}", bytes, path.display())),
    }
}

impl SpillFile {
    /// Opens or creates `dir/kvtier.spill` for `slabs` slabs of `slab_bytes`, preallocated.
    /// An existing file with the same layout is kept (and resized if `slabs` changed).
    pub fn open(dir: &Path, slab_bytes: u64, slabs: u64) -> anyhow::Result<(SpillFile, Found)> {
        if !dir.is_dir() {
            bail!(
                "spill directory {} does not exist: create it on the device meant for the disk tier \
                 (kvtierd never creates it, so that a missing mount cannot fill another disk)",
                dir.display()
            );
        }
        let path = dir.join(SPILL_FILE);
        let created = !path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .with_context(|| {
                format!("opening {} with O_DIRECT (tmpfs and some overlay filesystems refuse it)", path.display())
            })?;
        let mut page = AlignedPage::zeroed();
        let len = file.metadata()?.len();
        let old = match len >= HEADER_BYTES {
            true => file.read_exact_at(&mut page.0 .0, 0).ok().and_then(|()| Superblock::decode(&page.0 .0).ok()),
            false => None,
        };
        let bytes = HEADER_BYTES + slabs * slab_bytes;
        let (superblock, found) = match old {
            Some(sb) if sb.slab_bytes == slab_bytes && sb.header_bytes == HEADER_BYTES => {
                let found = if sb.slabs == slabs { Found::Reused } else { Found::Resized { from: sb.slabs } };
                (Superblock { slabs, ..sb }, found)
            }
            Some(sb) => {
                let why = format!(
                    "{} was cut into {} slabs with {} headers; the configuration asks for {} slabs: starting it empty",
                    path.display(),
                    bytesize::ByteSize(sb.slab_bytes),
                    sb.header_bytes,
                    bytesize::ByteSize(slab_bytes)
                );
                (Superblock { uuid: random_uuid()?, slab_bytes, slabs, header_bytes: HEADER_BYTES }, Found::Fresh(why))
            }
            None => {
                let why = match len {
                    0 => format!("new spill file {}", path.display()),
                    _ => format!("{} has no valid superblock: starting it empty", path.display()),
                };
                (Superblock { uuid: random_uuid()?, slab_bytes, slabs, header_bytes: HEADER_BYTES }, Found::Fresh(why))
            }
        };
        if len > bytes {
            file.set_len(bytes).with_context(|| format!("shrinking {}", path.display()))?;
        }
        preallocate(&file, &path, bytes, created, len.min(bytes))?;
        superblock.encode_into(&mut page.0 .0);
        file.write_all_at(&page.0 .0, 0).with_context(|| format!("writing the superblock of {}", path.display()))?;
        file.sync_all().with_context(|| format!("syncing {}", path.display()))?;
        Ok((SpillFile { file, path, superblock }, found))
    }

    /// Byte offset in the file of a slot at `offset` within the slab area.
    pub fn file_offset(offset: u64) -> u64 {
        HEADER_BYTES + offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopening_keeps_identity_and_resizing_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (a, found) = SpillFile::open(dir.path(), 1 << 20, 4).unwrap();
        assert!(matches!(found, Found::Fresh(_)));
        assert_eq!(a.file.metadata().unwrap().len(), HEADER_BYTES + (4 << 20));
        drop(a);
        let (b, found) = SpillFile::open(dir.path(), 1 << 20, 4).unwrap();
        assert_eq!(found, Found::Reused);
        let uuid = b.superblock.uuid;
        drop(b);
        let (c, found) = SpillFile::open(dir.path(), 1 << 20, 2).unwrap();
        assert_eq!((found, c.superblock.uuid), (Found::Resized { from: 4 }, uuid));
        assert_eq!(c.file.metadata().unwrap().len(), HEADER_BYTES + (2 << 20));
        drop(c);
        let (d, found) = SpillFile::open(dir.path(), 2 << 20, 2).unwrap();
        assert!(matches!(found, Found::Fresh(ref why) if why.contains("starting it empty")), "{found:?}");
        assert_ne!(d.superblock.uuid, uuid);
    }
}
