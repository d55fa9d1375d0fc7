//! The orphan list: inodes unlinked while still open on this client. They keep their
//! blocks until the last close; if the client crashes first, the next owner of its log
//! slot frees them when it mounts. The list lives in the slot's orphan region, as metadata
//! sectors covered by the slot's lock (logged like any other metadata).

use crate::error::{FsError, FsResult};
use crate::fs::Frangipani;
use crate::layout::{self, ORPHAN_BYTES};
use crate::locks::{LockName, Mode};
use crate::sector::{PAYLOAD_BYTES, SECTOR_BYTES};
use crate::txn::Txn;

/// Sectors of one slot's list.
const SECTORS: u64 = ORPHAN_BYTES / SECTOR_BYTES as u64;
/// Inode numbers per sector.
const PER_SECTOR: usize = PAYLOAD_BYTES / 8;

fn slot_of(payload: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(payload[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

impl Txn<'_> {
    /// Puts `ino` on this client's orphan list (in this transaction).
    pub(crate) fn add_orphan(&mut self, ino: u64) -> FsResult<()> {
        self.change_orphans(0, ino)
    }

    /// Takes `ino` off this client's orphan list.
    pub(crate) fn remove_orphan(&mut self, ino: u64) -> FsResult<()> {
        self.change_orphans(ino, 0)
    }

    /// Replaces the first entry equal to `from` with `to`.
    fn change_orphans(&mut self, from: u64, to: u64) -> FsResult<()> {
        let slot = self.fs.slot;
        let lock = LockName::Slot(slot);
        self.lock(lock.clone(), Mode::Exclusive)?;
        for n in 0..SECTORS {
            let addr = layout::orphan_sector(slot, n);
            let mut s = self.read(addr, &lock)?;
            if let Some(i) = (0..PER_SECTOR).find(|i| slot_of(s.payload(), *i) == from) {
                s.payload_mut()[i * 8..i * 8 + 8].copy_from_slice(&to.to_le_bytes());
                return self.write(addr, &lock, s);
            }
        }
        if from == 0 {
            return Err(FsError::NoSpace);
        }
        Ok(())
    }
}

impl Frangipani {
    /// Frees the inodes a previous owner of this client's slot left unlinked but open
    /// when it crashed (at mount, after its log was replayed), and clears the list.
    pub(crate) fn free_leftover_orphans(&self) -> FsResult<usize> {
        let slot = self.inner.slot;
        let start = layout::orphan_sector(slot, 0);
        let raw = self.inner.disk.read(start, ORPHAN_BYTES as usize)?;
        let mut found = Vec::new();
        for (n, sector) in raw.chunks(SECTOR_BYTES).enumerate() {
            let payload = &sector[SECTOR_BYTES - PAYLOAD_BYTES..];
            for i in 0..PER_SECTOR {
                let ino = slot_of(payload, i);
                if ino != 0 {
                    found.push((n as u64, ino));
                }
            }
        }
        let mut freed = 0;
        for (_, ino) in &found {
            let mut txn = Txn::new(&self.inner);
            txn.lock(LockName::Inode(*ino), Mode::Exclusive)?;
            let mut inode = txn.read_inode(*ino)?;
            if inode.in_use() && inode.nlink == 0 {
                self.free_inode(&mut txn, *ino, &mut inode)?;
                freed += 1;
            }
            txn.remove_orphan(*ino)?;
            txn.commit()?;
        }
        if freed > 0 {
            tracing::info!(slot, freed, "freed inodes left open and unlinked by a crashed client");
        }
        Ok(freed)
    }
}
