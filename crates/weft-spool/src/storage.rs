//! The seam between the spool and a file system: named files in one directory.
//!
//! The spool never touches `std::fs` itself; it talks to a [`Storage`]. [`FsStorage`] is the real
//! thing, [`crate::sim::SimStorage`] an in-memory one that can crash, tear writes, flip bits, run
//! out of space and fail an fsync, deterministically. The driver picks one; the simulation runs the
//! very same spool code over the simulated one.
//!
//! # Durability contract
//! The contract is the weakest one POSIX file systems keep, so that code correct against it is
//! correct on ext4, xfs, btrfs and APFS alike, and so that [`crate::sim::SimStorage`] can model it
//! exactly:
//! - [`Storage::append`] data is *pending*: a crash may drop it, or keep any prefix of it (a torn
//!   write). Only [`Storage::sync`] of that file makes it durable.
//! - [`Storage::create`], [`Storage::rename`] and [`Storage::remove`] change the directory; the
//!   change is durable only after [`Storage::sync_dir`]. A file whose creation was not yet
//!   directory-synced vanishes in a crash together with its (even fsynced) data; a removal that was
//!   not yet directory-synced may be undone.
//! - [`Storage::truncate`] is durable when it returns.
//! - Reads see everything written so far, durable or not.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Named files in one directory, with explicit durability (see the module docs for the contract).
///
/// Names are plain file names (no separators); implementations refuse anything else with
/// [`io::ErrorKind::InvalidInput`]. The spool only ever uses names it generated.
pub trait Storage {
    /// Names of all files in the directory, in no particular order.
    fn list(&self) -> io::Result<Vec<String>>;

    /// Current length of `name` in bytes (pending bytes included).
    fn len(&self, name: &str) -> io::Result<u64>;

    /// Fills `buf` from `name` starting at `offset`; fails with [`io::ErrorKind::UnexpectedEof`] if
    /// the file is shorter.
    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Creates the empty file `name`; fails with [`io::ErrorKind::AlreadyExists`] if it exists.
    /// Durable after [`Storage::sync_dir`].
    fn create(&mut self, name: &str) -> io::Result<()>;

    /// Appends `data` to the end of `name`. Pending until [`Storage::sync`]. On error, any prefix of
    /// `data` may have been appended.
    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<()>;

    /// Makes every byte appended to `name` so far durable (`fdatasync`).
    ///
    /// After an error the state of the pending bytes is unknown — Linux may have dropped them and
    /// marked the pages clean, so a retry can "succeed" without writing anything. The spool never
    /// retries: it stops and must be reopened, which re-reads what is really there.
    fn sync(&mut self, name: &str) -> io::Result<()>;

    /// Cuts `name` to `len` bytes, durably.
    fn truncate(&mut self, name: &str, len: u64) -> io::Result<()>;

    /// Renames `from` to `to`, replacing `to` if it exists. Durable after [`Storage::sync_dir`].
    fn rename(&mut self, from: &str, to: &str) -> io::Result<()>;

    /// Removes `name`. Durable after [`Storage::sync_dir`].
    fn remove(&mut self, name: &str) -> io::Result<()>;

    /// Makes every directory change so far (create, rename, remove) durable.
    fn sync_dir(&mut self) -> io::Result<()>;

    /// Reads the whole of `name`, refusing (with [`io::ErrorKind::InvalidData`]) a file longer than
    /// `len_max` before allocating for it.
    fn read(&self, name: &str, len_max: u64) -> io::Result<Vec<u8>> {
        let len = self.len(name)?;
        if len > len_max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{name} is {len} bytes, more than the {len_max} allowed"),
            ));
        }
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "file too large"))?;
        let mut buf = vec![0; len];
        self.read_at(name, 0, &mut buf)?;
        Ok(buf)
    }
}

impl<S: Storage + ?Sized> Storage for Box<S> {
    fn list(&self) -> io::Result<Vec<String>> {
        (**self).list()
    }
    fn len(&self, name: &str) -> io::Result<u64> {
        (**self).len(name)
    }
    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(name, offset, buf)
    }
    fn create(&mut self, name: &str) -> io::Result<()> {
        (**self).create(name)
    }
    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        (**self).append(name, data)
    }
    fn sync(&mut self, name: &str) -> io::Result<()> {
        (**self).sync(name)
    }
    fn truncate(&mut self, name: &str, len: u64) -> io::Result<()> {
        (**self).truncate(name, len)
    }
    fn rename(&mut self, from: &str, to: &str) -> io::Result<()> {
        (**self).rename(from, to)
    }
    fn remove(&mut self, name: &str) -> io::Result<()> {
        (**self).remove(name)
    }
    fn sync_dir(&mut self) -> io::Result<()> {
        (**self).sync_dir()
    }
    fn read(&self, name: &str, len_max: u64) -> io::Result<Vec<u8>> {
        (**self).read(name, len_max)
    }
}

/// Refuses names that are not a single plain path component.
pub(crate) fn check_name(name: &str) -> io::Result<()> {
    let bytes = name.as_bytes();
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !bytes.contains(&b'/')
        && !bytes.contains(&b'\\')
        && !bytes.contains(&0);
    if plain {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a plain file name: {name:?}"),
        ))
    }
}

/// Most append handles [`FsStorage`] keeps open. The spool appends to at most two files at a time
/// (the newest segment of each log) plus, briefly, a segment it is rolling away from; a few more
/// cover odd callers without letting descriptors pile up.
pub const OPEN_FILES_MAX: usize = 4;

/// [`Storage`] over a real directory with `std::fs`.
///
/// Appends go through a `File` kept open (in append mode) per file being written, so a batch is one
/// `write` call; [`Storage::sync`] is `fdatasync`; [`Storage::sync_dir`] fsyncs the directory
/// itself. Not internally locked: one process, one `FsStorage` per directory (the node's data-dir
/// lock is the driver's job).
pub struct FsStorage {
    dir: PathBuf,
    /// Append handles by file name, at most [`OPEN_FILES_MAX`].
    open: BTreeMap<String, File>,
}

impl fmt::Debug for FsStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FsStorage")
            .field("dir", &self.dir)
            .field("open", &self.open.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl FsStorage {
    /// Opens (creating it and its parents if needed) the directory `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            open: BTreeMap::new(),
        })
    }

    /// The directory this storage works in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> io::Result<PathBuf> {
        check_name(name)?;
        Ok(self.dir.join(name))
    }

    /// The append handle for `name`, opening it (and closing another if at the bound) if needed.
    fn handle(&mut self, name: &str) -> io::Result<&mut File> {
        if !self.open.contains_key(name) {
            let path = self.path(name)?;
            let file = OpenOptions::new().append(true).open(path)?;
            if self.open.len() >= OPEN_FILES_MAX {
                // Closing a handle loses nothing: written bytes are in the page cache, and a later
                // sync reopens the file (fsync works on the inode, not on the descriptor).
                self.open.pop_first();
            }
            self.open.insert(name.to_owned(), file);
        }
        self.open
            .get_mut(name)
            .ok_or_else(|| io::Error::other("append handle vanished"))
    }
}

impl Storage for FsStorage {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            // Names that are not UTF-8 cannot be ours; skip them.
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn len(&self, name: &str) -> io::Result<u64> {
        Ok(fs::metadata(self.path(name)?)?.len())
    }

    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut file = File::open(self.path(name)?)?;
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(buf)
    }

    fn create(&mut self, name: &str) -> io::Result<()> {
        let path = self.path(name)?;
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(path)?;
        if self.open.len() >= OPEN_FILES_MAX {
            self.open.pop_first();
        }
        self.open.insert(name.to_owned(), file);
        Ok(())
    }

    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        self.handle(name)?.write_all(data)
    }

    fn sync(&mut self, name: &str) -> io::Result<()> {
        self.handle(name)?.sync_data()
    }

    fn truncate(&mut self, name: &str, len: u64) -> io::Result<()> {
        let file = OpenOptions::new().write(true).open(self.path(name)?)?;
        file.set_len(len)?;
        file.sync_all()
    }

    fn rename(&mut self, from: &str, to: &str) -> io::Result<()> {
        let from_path = self.path(from)?;
        let to_path = self.path(to)?;
        self.open.remove(from);
        self.open.remove(to);
        fs::rename(from_path, to_path)
    }

    fn remove(&mut self, name: &str) -> io::Result<()> {
        let path = self.path(name)?;
        self.open.remove(name);
        fs::remove_file(path)
    }

    fn sync_dir(&mut self) -> io::Result<()> {
        #[cfg(unix)]
        {
            File::open(&self.dir)?.sync_all()
        }
        // Elsewhere a directory cannot be opened for fsync; its metadata is journaled with the
        // files' own.
        #[cfg(not(unix))]
        {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_plain() {
        for bad in ["", ".", "..", "a/b", "../x", "a\\b", "a\0b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["spool-0000000000000001.log", "x", "dead-1.log.quarantined"] {
            assert!(check_name(good).is_ok(), "{good:?}");
        }
    }
}
