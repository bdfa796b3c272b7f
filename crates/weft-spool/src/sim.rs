//! A simulated [`Storage`]: in memory, deterministic, and able to fail the way disks fail.
//!
//! It models exactly the contract in [`crate::storage`]: each file has *durable* bytes (a prefix)
//! and *pending* bytes after them; the directory has a durable listing and a current one. A
//! [`SimStorage::crash`] keeps only what was durable — optionally plus a random prefix of each
//! file's pending tail, which is what a torn write leaves behind. Faults are injected on request:
//! bit flips at chosen offsets, `ENOSPC` once a byte budget is used up, `EIO` on the next sync,
//! and the death of the process after a chosen number of writes (to stop a spool in the middle of
//! a multi-step operation such as a compaction).
//!
//! Everything is driven by an explicit seed: no OS randomness, no clock, so a simulation seed
//! replays byte for byte. The handle is cheap to clone and all clones share one state, so a test
//! keeps a clone to crash the "disk" under a spool it handed the other one to.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::storage::{check_name, Storage};

/// What a [`SimStorage::crash`] keeps of the bytes that were not yet durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// Every pending byte and every directory change not yet synced is lost.
    DropUnsynced,
    /// Directory changes not yet synced are lost; each file keeps a random prefix (possibly
    /// empty, possibly all) of its pending bytes — a torn write.
    TornTail,
}

/// Counts of the operations a [`SimStorage`] served, for asserting the spool's IO pattern (for
/// example: one write and one sync per batch, not one per record).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// [`Storage::append`] calls.
    pub appends: u64,
    /// Bytes appended.
    pub bytes_appended: u64,
    /// [`Storage::sync`] calls.
    pub syncs: u64,
    /// [`Storage::sync_dir`] calls.
    pub dir_syncs: u64,
    /// [`Storage::create`] calls.
    pub creates: u64,
    /// [`Storage::remove`] calls.
    pub removes: u64,
    /// [`Storage::read_at`] calls (including those made by [`Storage::read`]).
    pub reads: u64,
    /// Crashes simulated.
    pub crashes: u64,
}

/// One file's contents: `data[..durable_len]` is durable, the rest pending.
#[derive(Clone, Debug, Default)]
struct SimFile {
    data: Vec<u8>,
    durable_len: usize,
}

#[derive(Debug)]
struct SimState {
    random: SplitMix64,
    /// Current directory: name → inode.
    names: BTreeMap<String, u64>,
    /// The directory as of the last `sync_dir`.
    durable_names: BTreeMap<String, u64>,
    inodes: BTreeMap<u64, SimFile>,
    next_inode: u64,
    /// Bytes that may still be appended before `ENOSPC`; `None` is unlimited.
    space_budget: Option<u64>,
    /// The next `sync` or `sync_dir` fails with an IO error.
    fail_next_sync: bool,
    /// Writing operations that may still succeed before the simulated process dies; `None` is
    /// unlimited.
    writes_left: Option<u64>,
    stats: SimStats,
}

/// In-memory [`Storage`] with pending vs durable bytes, crashes and fault injection.
#[derive(Clone, Debug)]
pub struct SimStorage {
    state: Arc<Mutex<SimState>>,
}

/// A file's name and sizes, as listed by [`SimStorage::files`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimFileInfo {
    /// File name.
    pub name: String,
    /// Current length.
    pub len: u64,
    /// Bytes that would survive a crash (if the name itself is durable).
    pub durable_len: u64,
    /// Whether the name would survive a crash.
    pub name_durable: bool,
}

impl SimStorage {
    /// An empty directory whose random choices (torn-write lengths) all derive from `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: Arc::new(Mutex::new(SimState {
                random: SplitMix64::new(seed),
                names: BTreeMap::new(),
                durable_names: BTreeMap::new(),
                inodes: BTreeMap::new(),
                next_inode: 1,
                space_budget: None,
                fail_next_sync: false,
                writes_left: None,
                stats: SimStats::default(),
            })),
        }
    }

    fn state(&self) -> MutexGuard<'_, SimState> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Simulates power loss: what was not durable is lost (see [`CrashMode`]). Afterwards
    /// everything that survived counts as durable, as it is on a disk after a reboot.
    pub fn crash(&self, mode: CrashMode) {
        let mut state = self.state();
        let state = &mut *state;
        state.stats.crashes += 1;
        state.names = state.durable_names.clone();
        state.collect_garbage();
        for file in state.inodes.values_mut() {
            let pending = file.data.len() - file.durable_len;
            let keep = match mode {
                CrashMode::DropUnsynced => 0,
                CrashMode::TornTail => state.random.below(pending as u64 + 1) as usize,
            };
            file.data.truncate(file.durable_len + keep);
            file.durable_len = file.data.len();
        }
        state.fail_next_sync = false;
        state.writes_left = None;
    }

    /// Flips bit `bit` (0..8) of the byte at `offset` in `name` — durable or pending, it is the
    /// medium that rots.
    pub fn flip_bit(&self, name: &str, offset: u64, bit: u8) -> io::Result<()> {
        let mut state = self.state();
        let file = state.file_mut(name)?;
        let byte = usize::try_from(offset)
            .ok()
            .and_then(|offset| file.data.get_mut(offset))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset past the end"))?;
        *byte ^= 1 << (bit % 8);
        Ok(())
    }

    /// From now on, appends fail with `ENOSPC` ([`io::ErrorKind::StorageFull`]) once `bytes` more
    /// bytes were appended; the failing append writes what still fits, like a short write. `None`
    /// lifts the limit.
    pub fn set_space_budget(&self, bytes: Option<u64>) {
        self.state().space_budget = bytes;
    }

    /// The next [`Storage::sync`] or [`Storage::sync_dir`] fails with `EIO`, leaving the pending
    /// bytes pending.
    pub fn fail_next_sync(&self) {
        self.state().fail_next_sync = true;
    }

    /// Simulates the death of the process using this storage after `writes` more writing
    /// operations (create, append, sync, truncate, rename, remove, directory sync): every later
    /// one fails without effect — except an append, which leaves a random prefix of its bytes
    /// pending, as a write cut short does. Reads keep working. Follow it with
    /// [`SimStorage::crash`] (which lifts it) and a reopen, as after a real death; `None` lifts
    /// it without a crash.
    pub fn stop_after_writes(&self, writes: Option<u64>) {
        self.state().writes_left = writes;
    }

    /// Every file with its sizes, by name.
    pub fn files(&self) -> Vec<SimFileInfo> {
        let state = self.state();
        state
            .names
            .iter()
            .filter_map(|(name, inode)| {
                let file = state.inodes.get(inode)?;
                Some(SimFileInfo {
                    name: name.clone(),
                    len: file.data.len() as u64,
                    durable_len: file.durable_len as u64,
                    name_durable: state.durable_names.get(name) == Some(inode),
                })
            })
            .collect()
    }

    /// Operation counts so far.
    pub fn stats(&self) -> SimStats {
        self.state().stats
    }

    /// A number drawn from the storage's own seeded generator, below `bound` (0 if `bound` is 0).
    /// Lets a test pick fault positions from the same deterministic stream.
    pub fn random_below(&self, bound: u64) -> u64 {
        self.state().random.below(bound)
    }
}

impl SimState {
    fn file(&self, name: &str) -> io::Result<&SimFile> {
        check_name(name)?;
        self.names
            .get(name)
            .and_then(|inode| self.inodes.get(inode))
            .ok_or_else(|| not_found(name))
    }

    fn file_mut(&mut self, name: &str) -> io::Result<&mut SimFile> {
        check_name(name)?;
        let inode = *self.names.get(name).ok_or_else(|| not_found(name))?;
        self.inodes.get_mut(&inode).ok_or_else(|| not_found(name))
    }

    /// Drops inodes that no listing (current or durable) refers to any more.
    fn collect_garbage(&mut self) {
        // Every inode is referenced by a listing, and each listing references distinct inodes: if
        // there are no more inodes than the longer listing has names, none is garbage.
        if self.inodes.len() <= self.names.len().max(self.durable_names.len()) {
            return;
        }
        let referenced: BTreeSet<u64> = self
            .names
            .values()
            .chain(self.durable_names.values())
            .copied()
            .collect();
        self.inodes.retain(|inode, _| referenced.contains(inode));
    }

    /// Counts one writing operation against [`SimStorage::stop_after_writes`]; `Err` once the
    /// simulated process is dead.
    fn take_write(&mut self) -> io::Result<()> {
        match &mut self.writes_left {
            Some(0) => Err(io::Error::other("simulated process death")),
            Some(left) => {
                *left -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn take_sync_failure(&mut self) -> io::Result<()> {
        if std::mem::take(&mut self.fail_next_sync) {
            Err(io::Error::other("simulated EIO on fsync"))
        } else {
            Ok(())
        }
    }
}

fn not_found(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("no file {name:?}"))
}

impl Storage for SimStorage {
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.state().names.keys().cloned().collect())
    }

    fn len(&self, name: &str) -> io::Result<u64> {
        Ok(self.state().file(name)?.data.len() as u64)
    }

    fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut state = self.state();
        state.stats.reads += 1;
        let file = state.file(name)?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let bytes = start
            .checked_add(buf.len())
            .and_then(|end| file.data.get(start..end))
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"))?;
        buf.copy_from_slice(bytes);
        Ok(())
    }

    fn create(&mut self, name: &str) -> io::Result<()> {
        check_name(name)?;
        let mut state = self.state();
        state.take_write()?;
        state.stats.creates += 1;
        if state.names.contains_key(name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{name:?} exists"),
            ));
        }
        let inode = state.next_inode;
        state.next_inode += 1;
        state.inodes.insert(inode, SimFile::default());
        state.names.insert(name.to_owned(), inode);
        Ok(())
    }

    fn append(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        let mut state = self.state();
        let state = &mut *state;
        if let Err(death) = state.take_write() {
            let cut = state.random.below(data.len() as u64 + 1) as usize;
            state.file_mut(name)?.data.extend_from_slice(&data[..cut]);
            return Err(death);
        }
        state.stats.appends += 1;
        let fits = match state.space_budget {
            Some(budget) => data
                .len()
                .min(usize::try_from(budget).unwrap_or(usize::MAX)),
            None => data.len(),
        };
        let file = state.file_mut(name)?;
        file.data.extend_from_slice(&data[..fits]);
        state.stats.bytes_appended += fits as u64;
        if let Some(budget) = &mut state.space_budget {
            *budget -= fits as u64;
        }
        if fits < data.len() {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "simulated ENOSPC",
            ));
        }
        Ok(())
    }

    fn sync(&mut self, name: &str) -> io::Result<()> {
        let mut state = self.state();
        state.take_write()?;
        state.stats.syncs += 1;
        state.file(name)?;
        state.take_sync_failure()?;
        let file = state.file_mut(name)?;
        file.durable_len = file.data.len();
        Ok(())
    }

    fn truncate(&mut self, name: &str, len: u64) -> io::Result<()> {
        let mut state = self.state();
        state.take_write()?;
        let file = state.file_mut(name)?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len < file.data.len() {
            file.data.truncate(len);
        }
        file.durable_len = file.durable_len.min(len);
        Ok(())
    }

    fn rename(&mut self, from: &str, to: &str) -> io::Result<()> {
        check_name(from)?;
        check_name(to)?;
        let mut state = self.state();
        state.take_write()?;
        let inode = state.names.remove(from).ok_or_else(|| not_found(from))?;
        state.names.insert(to.to_owned(), inode);
        state.collect_garbage();
        Ok(())
    }

    fn remove(&mut self, name: &str) -> io::Result<()> {
        check_name(name)?;
        let mut state = self.state();
        state.take_write()?;
        state.stats.removes += 1;
        state.names.remove(name).ok_or_else(|| not_found(name))?;
        state.collect_garbage();
        Ok(())
    }

    fn sync_dir(&mut self) -> io::Result<()> {
        let mut state = self.state();
        state.take_write()?;
        state.stats.dir_syncs += 1;
        state.take_sync_failure()?;
        state.durable_names = state.names.clone();
        state.collect_garbage();
        Ok(())
    }
}

/// SplitMix64: a tiny, fast, seedable generator (the same one `weft-proto` uses for jitter).
#[derive(Clone, Debug)]
struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    const fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-enough in `0..bound` (0 when `bound` is 0).
    fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            0
        } else {
            self.next_u64() % bound
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_drops_pending_bytes_and_unsynced_directory_changes() {
        let mut sim = SimStorage::new(1);
        sim.create("a").unwrap();
        sim.append("a", b"durable").unwrap();
        sim.sync("a").unwrap();
        sim.sync_dir().unwrap();
        sim.append("a", b"pending").unwrap();
        sim.create("b").unwrap();
        sim.append("b", b"x").unwrap();
        sim.sync("b").unwrap();
        sim.crash(CrashMode::DropUnsynced);
        assert_eq!(sim.list().unwrap(), vec!["a".to_owned()]);
        assert_eq!(sim.read("a", 100).unwrap(), b"durable");
    }

    #[test]
    fn torn_crash_keeps_a_prefix_of_the_pending_tail() {
        for seed in 0..50 {
            let mut sim = SimStorage::new(seed);
            sim.create("a").unwrap();
            sim.sync_dir().unwrap();
            sim.append("a", b"0123").unwrap();
            sim.sync("a").unwrap();
            sim.append("a", b"456789").unwrap();
            sim.crash(CrashMode::TornTail);
            let data = sim.read("a", 100).unwrap();
            assert!(
                b"0123456789".starts_with(&data) && data.len() >= 4,
                "{data:?}"
            );
        }
    }

    #[test]
    fn removal_is_undone_by_a_crash_before_sync_dir() {
        let mut sim = SimStorage::new(1);
        sim.create("a").unwrap();
        sim.append("a", b"x").unwrap();
        sim.sync("a").unwrap();
        sim.sync_dir().unwrap();
        sim.remove("a").unwrap();
        assert!(sim.list().unwrap().is_empty());
        sim.crash(CrashMode::DropUnsynced);
        assert_eq!(sim.read("a", 10).unwrap(), b"x");
    }

    #[test]
    fn faults_are_injected_on_request() {
        let mut sim = SimStorage::new(1);
        sim.create("a").unwrap();
        sim.set_space_budget(Some(3));
        let error = sim.append("a", b"12345").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::StorageFull);
        assert_eq!(sim.read("a", 10).unwrap(), b"123");
        sim.set_space_budget(None);
        sim.fail_next_sync();
        assert!(sim.sync("a").is_err());
        assert_eq!(sim.files()[0].durable_len, 0);
        sim.sync("a").unwrap();
        assert_eq!(sim.files()[0].durable_len, 3);
        sim.flip_bit("a", 0, 0).unwrap();
        assert_eq!(sim.read("a", 10).unwrap(), b"023");
        assert!(sim.flip_bit("a", 3, 0).is_err());
    }

    #[test]
    fn a_stopped_process_writes_nothing_more_until_the_crash() {
        let mut sim = SimStorage::new(1);
        sim.create("a").unwrap();
        sim.stop_after_writes(Some(2));
        sim.append("a", b"12").unwrap();
        sim.sync("a").unwrap();
        // Dead: an append leaves a prefix (here of 0 to 3 bytes), everything else nothing.
        assert!(sim.append("a", b"345").is_err());
        assert!(sim.sync("a").is_err());
        assert!(sim.create("b").is_err());
        assert!(sim.remove("a").is_err());
        assert!(sim.sync_dir().is_err());
        let len = sim.files()[0].len;
        assert!((2..=5).contains(&len));
        assert!(sim.read("a", 10).unwrap().starts_with(b"12"));
        // The crash lifts it (and drops what was never synced, the name included).
        sim.crash(CrashMode::DropUnsynced);
        assert!(sim.files().is_empty());
        sim.create("a").unwrap();
        sim.sync_dir().unwrap();
    }
}
