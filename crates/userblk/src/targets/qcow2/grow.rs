//! Growing an image's virtual size (`userblk resize`): a larger L1 table
//! where the old one cannot map the new size, then the header's size.
//!
//! The order keeps the image consistent after a crash at any point (see
//! [`super::meta`]): everything written so far is flushed; the new L1 table
//! and its clusters' refcounts are durable before the header points at it;
//! the header's L1 fields are durable before its size says more than the
//! old table maps; the old table is released only after that.

use std::os::unix::fs::FileExt;

use rustix::io::Errno;

use super::header::{self, Header};
use super::meta::{io_err, write_entries, Meta};

/// Header offset of the virtual size (big-endian u64).
const OFF_SIZE: u64 = 24;
/// Header offset of `l1_size` (u32), followed by `l1_table_offset` (u64).
const OFF_L1: u64 = 36;

impl Meta {
    /// Make the image `new_size` bytes large (not smaller than now).
    pub fn grow(&mut self, new_size: u64) -> Result<(), Errno> {
        self.writable()?;
        // Nothing dirty stays behind in memory: the L1 table copied below
        // must point only at L2 tables that are on disk.
        self.flush()?;
        let entries = Header::l1_entries_for(new_size, self.g.cluster_bits);
        let entries = usize::try_from(entries).map_err(|_| Errno::FBIG)?;
        if entries > self.l1.len() {
            self.move_l1(entries)?;
        }
        self.file
            .write_all_at(&new_size.to_be_bytes(), OFF_SIZE)
            .map_err(|e| io_err(&e))?;
        self.sync()?;
        // The old table's clusters are released by this flush.
        self.flush()
    }

    /// Copy the L1 table to a new place with `entries` entries (the new
    /// ones unmapped) and point the header at it.
    fn move_l1(&mut self, entries: usize) -> Result<(), Errno> {
        if entries as u64 * 8 > header::MAX_L1_BYTES {
            return Err(Errno::FBIG);
        }
        let cs = self.g.cluster_size;
        let clusters = (entries as u64 * 8).div_ceil(cs);
        let old = (self.l1_offset, (self.l1.len() as u64 * 8).div_ceil(cs));
        let off = self.alloc(clusters)?;
        let mut table = self.l1.clone();
        table.resize(entries, 0);
        // The new clusters are zero past the entries written, as the
        // format wants a table's padding to be.
        write_entries(&self.file, &vec![0; (clusters * cs / 8) as usize], off)?;
        write_entries(&self.file, &table, off)?;
        // Refcounts of the new table, and the table itself, before the header.
        self.flush()?;
        let mut f = [0u8; 12];
        let n = u32::try_from(entries).map_err(|_| Errno::FBIG)?;
        f[..4].copy_from_slice(&n.to_be_bytes());
        f[4..].copy_from_slice(&off.to_be_bytes());
        self.file.write_all_at(&f, OFF_L1).map_err(|e| io_err(&e))?;
        self.sync()?;
        self.l1 = table;
        self.l1_offset = off;
        for c in old.0 / cs..old.0 / cs + old.1 {
            self.pending_free.push(c);
        }
        tracing::info!("qcow2: L1 table grew to {entries} entries at {off:#x}");
        Ok(())
    }
}
