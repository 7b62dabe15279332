//! The file work of the data directory, behind one small interface, so
//! that the same durability code runs on the real filesystem in production
//! and on a simulated disk (`super::sim`) that loses what was never
//! synced, in the power-loss search.
//!
//! Owns: the operations the data directory needs of a filesystem, and
//! their production implementation ([`RealFs`]) over `std::fs`. Must not
//! touch: what the files hold (framing, recovery), the store.
//!
//! The interface is a flat directory of named files: the data directory
//! has no subdirectories. Paths are file names inside the directory the
//! storage was opened on.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A file of the data directory, opened for appending and reading.
pub trait StorageFile: Send + Sync + std::fmt::Debug {
    /// Appends all of `buf` at the end of the file.
    fn append(&self, buf: &[u8]) -> io::Result<()>;
    /// Reads into `buf` from `offset`; returns how many bytes were read
    /// (0 at the end).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// The file's size.
    fn len(&self) -> io::Result<u64>;
    /// True when the file holds no byte.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Cuts (or extends with zeros) the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes the file's contents durable (`fdatasync`).
    fn sync(&self) -> io::Result<()>;
}

/// What the data directory does with the directory it lives in.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Creates the directory (and its parents) if needed.
    fn create_dir(&self) -> io::Result<()>;
    /// The names in the directory, subdirectories included.
    fn list(&self) -> io::Result<Vec<String>>;
    /// True when `name` is a directory (such as a volume's `lost+found`).
    fn is_dir(&self, name: &str) -> bool;
    /// Opens `name` to append to and read, creating it (empty) when absent.
    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>>;
    /// Opens `name` for reading; `NotFound` when absent.
    fn open_existing(&self, name: &str) -> io::Result<Arc<dyn StorageFile>>;
    /// Renames `from` to `to`, replacing `to`.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Removes `name`.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes the directory's entries durable (creations, renames, removals).
    fn sync_dir(&self) -> io::Result<()>;
    /// Takes the directory's exclusive lock for as long as the returned
    /// guard lives; `None` when another holder has it.
    fn lock(&self) -> io::Result<Option<Box<dyn std::any::Any + Send + Sync>>>;
    /// A fresh per-file salt for the framing's checksums.
    fn salt(&self) -> u64;
    /// The full path of `name`, for messages.
    fn path_of(&self, name: &str) -> PathBuf;
}

/// Writes a small file whole so that it is there after a crash or absent,
/// never half: `name.tmp`, fsync, rename, fsync of the directory.
pub(crate) fn write_atomically(storage: &dyn Storage, name: &str, text: &[u8]) -> io::Result<()> {
    let tmp = format!("{name}.tmp");
    let file = storage.open(&tmp)?;
    file.set_len(0)?;
    file.append(text)?;
    file.sync()?;
    storage.rename(&tmp, name)?;
    storage.sync_dir()
}

/// Reads a whole small file; `None` when it is absent.
pub(crate) fn read_small(storage: &dyn Storage, name: &str) -> io::Result<Option<Vec<u8>>> {
    let file = match storage.open_existing(name) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = file.len()?.min(1 << 16) as usize;
    let mut buf = vec![0; len];
    let mut at = 0;
    while at < len {
        let n = file.read_at(at as u64, &mut buf[at..])?;
        if n == 0 {
            break;
        }
        at += n;
    }
    buf.truncate(at);
    Ok(Some(buf))
}

/// The real filesystem: one directory.
#[derive(Debug, Clone)]
pub struct RealFs {
    dir: PathBuf,
}

impl RealFs {
    /// The directory `dir` (created by [`Storage::create_dir`]).
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }
}

impl StorageFile for File {
    fn append(&self, buf: &[u8]) -> io::Result<()> {
        // Opened in append mode: every write lands at the current end,
        // also after a failed write was cut back off.
        (&*self).write_all(buf)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }
}

impl Storage for RealFs {
    fn create_dir(&self) -> io::Result<()> {
        fs::create_dir_all(&self.dir)
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    fn is_dir(&self, name: &str) -> bool {
        self.dir.join(name).is_dir()
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(self.dir.join(name))?;
        Ok(Arc::new(file))
    }

    fn open_existing(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        Ok(Arc::new(File::open(self.dir.join(name))?))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        fs::rename(self.dir.join(from), self.dir.join(to))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        fs::remove_file(self.dir.join(name))
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn lock(&self) -> io::Result<Option<Box<dyn std::any::Any + Send + Sync>>> {
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join("LOCK"))?;
        match lock.try_lock() {
            Ok(()) => Ok(Some(Box::new(lock))),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }

    fn salt(&self) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS's randomness once per process
        // and varies per instance; the time and a counter make each file's
        // salt differ even within one process.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        h.write_u64(nanos);
        h.write_u32(std::process::id());
        h.finish()
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}
