//! A simulated disk for the power-loss search: an in-memory
//! [`Storage`] that models what a kernel may keep of a directory when the
//! power goes, after FoundationDB's simulation, TigerBeetle's VOPR and the
//! ALICE study of crash states.
//!
//! Owns: the model. Must not touch: the data directory's logic; it only
//! answers the calls [`Storage`] names, and makes crash images.
//!
//! # The model
//! - Writes go to a page cache; `sync` of a file makes its contents as
//!   written durable; `sync_dir` makes the directory's entries (creations,
//!   renames, removals) durable.
//! - A power cut ([`SimDisk::crash`]) keeps each file's durable bytes and
//!   any prefix of what was written after them (cut at any byte), with
//!   whole 4 KiB pages of that unsynced part possibly zero-filled (the
//!   size reached the disk, the data did not); a file truncated since its
//!   last sync comes back as it was synced or as it is now, cut. Every
//!   directory entry changed since the last `sync_dir` comes back, each on
//!   its own, as it was durable or as it is now.
//! - Faults: an injected `sync` failure (EIO) drops the file's dirty
//!   pages, which then never reach the disk (a later `sync` reports
//!   success and writes only what came after: Linux's behaviour); an
//!   injected full disk (ENOSPC) fails appends once the budget is spent,
//!   after writing what fitted; an injected truncate failure.
//!
//! One thread drives it at a time (the search is sequential), so a sync
//! never overlaps an append: what a real kernel may do with writes that
//! race a failing `fsync` is not modelled.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::storage::{Storage, StorageFile};

/// A small deterministic generator (SplitMix64): the search replays
/// exactly from its seed.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// True with probability `1/n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

const PAGE: usize = 4096;

#[derive(Debug, Clone, Default)]
struct SimFile {
    /// What reads see (the page cache).
    data: Vec<u8>,
    /// What is on the disk.
    durable: Vec<u8>,
    /// Ranges whose pages a failed sync dropped: they never reach the disk.
    dropped: Vec<(usize, usize)>,
}

impl SimFile {
    /// What a sync would put on the disk: the data, less dropped pages.
    fn target(&self) -> Vec<u8> {
        let mut out = self.data.clone();
        for &(from, to) in &self.dropped {
            let to = to.min(out.len());
            if from < to {
                out[from..to].fill(0);
            }
        }
        out
    }

    /// What the disk may hold after a power cut.
    fn crashed(&self, rng: &mut SimRng) -> Vec<u8> {
        let target = self.target();
        let d = &self.durable;
        let extends = target.len() >= d.len() && target[..d.len()] == d[..];
        let (base, tail) = if extends {
            (d.len(), &target[d.len()..])
        } else if rng.one_in(2) {
            return d.clone();
        } else {
            let common = d.iter().zip(&target).take_while(|(a, b)| a == b).count();
            (common, &target[common..])
        };
        let keep = rng.below(tail.len() as u64 + 1) as usize;
        let mut out = target[..base].to_vec();
        out.extend_from_slice(&tail[..keep]);
        // Pages of the unsynced part may hold zeros, each on its own
        // (written back in any order, the size first).
        if keep > 0 && rng.one_in(3) {
            let first = base / PAGE;
            let last = (base + keep - 1) / PAGE;
            for page in first..=last {
                if rng.one_in(2) {
                    let from = (page * PAGE).max(base);
                    let to = ((page + 1) * PAGE).min(out.len());
                    out[from..to].fill(0);
                }
            }
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    File(u64),
    Dir,
}

/// Faults to inject; each fires once and clears (but the disk budget,
/// which stays until raised).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// The next `sync` of a file fails with EIO and drops its dirty pages.
    pub fail_next_sync: bool,
    /// Appends past this many more bytes fail with ENOSPC.
    pub space_left: Option<u64>,
    /// The next `set_len` fails with EIO.
    pub fail_next_set_len: bool,
}

#[derive(Debug, Clone, Default)]
struct State {
    files: HashMap<u64, SimFile>,
    names: BTreeMap<String, Node>,
    durable_names: BTreeMap<String, Node>,
    next_inode: u64,
    /// Bumped by a power cut: handles from before it fail.
    epoch: u64,
    locked: bool,
    faults: Faults,
    salt: u64,
    /// Crash points captured, one per mutating call, when capturing.
    capture: bool,
    points: Vec<Image>,
}

/// The disk at one moment, to make crash images from.
#[derive(Debug, Clone)]
pub struct Image {
    files: HashMap<u64, SimFile>,
    names: BTreeMap<String, Node>,
    durable_names: BTreeMap<String, Node>,
}

impl Image {
    /// A disk holding what a power cut at this moment may leave.
    pub fn crash(&self, rng: &mut SimRng) -> SimDisk {
        let mut names = self.durable_names.clone();
        let changed: Vec<&String> = self
            .names
            .keys()
            .chain(self.durable_names.keys())
            .filter(|n| self.names.get(*n) != self.durable_names.get(*n))
            .collect();
        for name in changed {
            if rng.one_in(2) {
                match self.names.get(name) {
                    Some(node) => names.insert(name.clone(), *node),
                    None => names.remove(name),
                };
            }
        }
        let mut files = HashMap::new();
        for node in names.values() {
            if let Node::File(inode) = node
                && let Some(file) = self.files.get(inode)
                && !files.contains_key(inode)
            {
                let bytes = file.crashed(rng);
                files.insert(
                    *inode,
                    SimFile {
                        data: bytes.clone(),
                        durable: bytes,
                        dropped: Vec::new(),
                    },
                );
            }
        }
        let next_inode = self.files.keys().max().map_or(0, |m| m + 1);
        SimDisk::from_state(State {
            files,
            durable_names: names.clone(),
            names,
            next_inode,
            salt: rng.next_u64(),
            ..State::default()
        })
    }

    /// A disk holding exactly this image, as if everything were synced
    /// (a clean restart: the page cache survives a process's death).
    pub fn restarted(&self) -> SimDisk {
        let files = self
            .names
            .values()
            .filter_map(|n| match n {
                Node::File(i) => self.files.get(i).map(|f| {
                    let data = f.data.clone();
                    // What a failed sync dropped still reads back as
                    // written from the page cache until a power cut.
                    (
                        *i,
                        SimFile {
                            data: data.clone(),
                            durable: f.durable.clone(),
                            dropped: f.dropped.clone(),
                        },
                    )
                }),
                Node::Dir => None,
            })
            .collect();
        SimDisk::from_state(State {
            files,
            names: self.names.clone(),
            durable_names: self.durable_names.clone(),
            next_inode: self.files.keys().max().map_or(0, |m| m + 1),
            ..State::default()
        })
    }

    /// The names in the directory and each file's size as reads see it.
    pub fn listing(&self) -> Vec<(String, usize)> {
        self.names
            .iter()
            .map(|(name, node)| match node {
                Node::File(i) => (name.clone(), self.files.get(i).map_or(0, |f| f.data.len())),
                Node::Dir => (format!("{name}/"), 0),
            })
            .collect()
    }

    /// Each name with its file's size as reads see it, as synced, and the
    /// ranges a failed sync dropped: for a failing search's report.
    pub fn describe(&self) -> String {
        let mut out = Vec::new();
        for (name, node) in &self.names {
            let durable = self.durable_names.get(name) == Some(node);
            match node {
                Node::File(i) => {
                    let f = self.files.get(i).cloned().unwrap_or_default();
                    out.push(format!(
                        "{name}{}: {} bytes, {} synced, dropped {:?}",
                        if durable { "" } else { " (name not synced)" },
                        f.data.len(),
                        f.durable.len(),
                        f.dropped
                    ));
                }
                Node::Dir => out.push(format!("{name}/")),
            }
        }
        out.join("; ")
    }

    /// Flips one byte of `name` at `offset` on the disk (and in the page
    /// cache): damage a power cut cannot make.
    pub fn damage(&mut self, name: &str, offset: usize) -> bool {
        let Some(Node::File(i)) = self.names.get(name) else {
            return false;
        };
        let Some(file) = self.files.get_mut(i) else {
            return false;
        };
        let mut hit = false;
        for bytes in [&mut file.data, &mut file.durable] {
            if let Some(b) = bytes.get_mut(offset) {
                *b ^= 0x5a;
                hit = true;
            }
        }
        hit
    }

    /// The bytes of `name` as reads see them.
    pub fn contents(&self, name: &str) -> Option<&[u8]> {
        match self.names.get(name)? {
            Node::File(i) => self.files.get(i).map(|f| &f.data[..]),
            Node::Dir => None,
        }
    }
}

/// The simulated disk: one directory. Clones share the disk.
#[derive(Debug, Clone)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
}

impl Default for SimDisk {
    fn default() -> Self {
        Self::from_state(State::default())
    }
}

impl SimDisk {
    fn from_state(state: State) -> Self {
        Self {
            state: Arc::new(Mutex::new(state)),
        }
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The disk as it is now.
    pub fn image(&self) -> Image {
        let s = self.lock_state();
        Image {
            files: s.files.clone(),
            names: s.names.clone(),
            durable_names: s.durable_names.clone(),
        }
    }

    /// Starts or stops keeping an image after every mutating call.
    pub fn set_capture(&self, on: bool) {
        self.lock_state().capture = on;
    }

    /// The images kept since the last call.
    pub fn take_points(&self) -> Vec<Image> {
        std::mem::take(&mut self.lock_state().points)
    }

    /// Sets the faults to inject.
    pub fn set_faults(&self, faults: Faults) {
        self.lock_state().faults = faults;
    }

    /// Adds a directory entry that is a directory (`lost+found`).
    pub fn add_dir(&self, name: &str) {
        let mut s = self.lock_state();
        s.names.insert(name.to_owned(), Node::Dir);
        s.durable_names.insert(name.to_owned(), Node::Dir);
    }

    /// Seeds the salts this disk hands out.
    pub fn set_salt_seed(&self, seed: u64) {
        self.lock_state().salt = seed;
    }

    /// Makes every handle from before this call fail, as a power cut or a
    /// process's death does.
    pub fn kill_handles(&self) {
        let mut s = self.lock_state();
        s.epoch += 1;
        s.locked = false;
    }

    fn mutated(s: &mut State) {
        if s.capture {
            let image = Image {
                files: s.files.clone(),
                names: s.names.clone(),
                durable_names: s.durable_names.clone(),
            };
            s.points.push(image);
        }
    }
}

fn gone() -> io::Error {
    io::Error::other("the simulated disk lost power (a stale handle)")
}

#[derive(Debug)]
struct Handle {
    disk: SimDisk,
    inode: u64,
    epoch: u64,
}

impl Handle {
    fn with<T>(&self, f: impl FnOnce(&mut State, u64) -> io::Result<T>) -> io::Result<T> {
        let mut s = self.disk.lock_state();
        if s.epoch != self.epoch || !s.files.contains_key(&self.inode) {
            return Err(gone());
        }
        f(&mut s, self.inode)
    }
}

fn file(s: &mut State, inode: u64) -> &mut SimFile {
    s.files.entry(inode).or_default()
}

impl StorageFile for Handle {
    fn append(&self, buf: &[u8]) -> io::Result<()> {
        self.with(|s, inode| {
            let fits = match s.faults.space_left {
                Some(left) => (left as usize).min(buf.len()),
                None => buf.len(),
            };
            if let Some(left) = &mut s.faults.space_left {
                *left -= fits as u64;
            }
            file(s, inode).data.extend_from_slice(&buf[..fits]);
            SimDisk::mutated(s);
            if fits < buf.len() {
                return Err(io::Error::from_raw_os_error(28));
            }
            Ok(())
        })
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.with(|s, inode| {
            let data = &file(s, inode).data;
            let from = (offset as usize).min(data.len());
            let n = buf.len().min(data.len() - from);
            buf[..n].copy_from_slice(&data[from..from + n]);
            Ok(n)
        })
    }

    fn len(&self) -> io::Result<u64> {
        self.with(|s, inode| Ok(file(s, inode).data.len() as u64))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.with(|s, inode| {
            if std::mem::take(&mut s.faults.fail_next_set_len) {
                return Err(io::Error::from_raw_os_error(5));
            }
            let f = file(s, inode);
            f.data.resize(len as usize, 0);
            // Pages cut off are gone, dropped or not: what is written past
            // the new end later is new.
            let len = len as usize;
            f.dropped.retain_mut(|r| {
                r.1 = r.1.min(len);
                r.0 < r.1
            });
            SimDisk::mutated(s);
            Ok(())
        })
    }

    fn sync(&self) -> io::Result<()> {
        self.with(|s, inode| {
            let fail = std::mem::take(&mut s.faults.fail_next_sync);
            let f = file(s, inode);
            if fail {
                // The dirty pages are marked clean without reaching the
                // disk: they never will.
                let from = f.durable.len().min(f.data.len());
                f.dropped.push((from, f.data.len()));
                SimDisk::mutated(s);
                return Err(io::Error::from_raw_os_error(5));
            }
            f.durable = f.target();
            f.dropped.retain(|&(_, to)| to > f.durable.len());
            SimDisk::mutated(s);
            Ok(())
        })
    }
}

impl Storage for SimDisk {
    fn create_dir(&self) -> io::Result<()> {
        Ok(())
    }

    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.lock_state().names.keys().cloned().collect())
    }

    fn is_dir(&self, name: &str) -> bool {
        self.lock_state().names.get(name) == Some(&Node::Dir)
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let mut s = self.lock_state();
        let inode = match s.names.get(name) {
            Some(Node::File(i)) => *i,
            Some(Node::Dir) => return Err(io::Error::other("is a directory")),
            None => {
                let i = s.next_inode;
                s.next_inode += 1;
                s.files.insert(i, SimFile::default());
                s.names.insert(name.to_owned(), Node::File(i));
                SimDisk::mutated(&mut s);
                i
            }
        };
        Ok(Arc::new(Handle {
            disk: self.clone(),
            inode,
            epoch: s.epoch,
        }))
    }

    fn open_existing(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let s = self.lock_state();
        match s.names.get(name) {
            Some(Node::File(i)) => Ok(Arc::new(Handle {
                disk: self.clone(),
                inode: *i,
                epoch: s.epoch,
            })),
            Some(Node::Dir) => Err(io::Error::other("is a directory")),
            None => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut s = self.lock_state();
        let node = s
            .names
            .remove(from)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        s.names.insert(to.to_owned(), node);
        SimDisk::mutated(&mut s);
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut s = self.lock_state();
        s.names
            .remove(name)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        SimDisk::mutated(&mut s);
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut s = self.lock_state();
        s.durable_names = s.names.clone();
        SimDisk::mutated(&mut s);
        Ok(())
    }

    fn lock(&self) -> io::Result<Option<Box<dyn std::any::Any + Send + Sync>>> {
        let mut s = self.lock_state();
        if s.locked {
            return Ok(None);
        }
        s.locked = true;
        Ok(Some(Box::new(SimLock(self.clone()))))
    }

    fn salt(&self) -> u64 {
        let mut s = self.lock_state();
        s.salt = s.salt.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut rng = SimRng::new(s.salt);
        rng.next_u64()
    }

    fn path_of(&self, name: &str) -> PathBuf {
        PathBuf::from("sim").join(name)
    }
}

/// The simulated directory lock: released when dropped.
#[derive(Debug)]
struct SimLock(SimDisk);

impl Drop for SimLock {
    fn drop(&mut self) {
        self.0.lock_state().locked = false;
    }
}
