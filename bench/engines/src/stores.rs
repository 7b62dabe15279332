//! fjall and redb behind one small interface: a write of one entry or of
//! a batch in one commit, durable or not, and a sync of everything
//! written so far.

use std::path::Path;

use anyhow::{Context, Result};

use crate::workload::{self, Map};

/// An embedded engine opened on a directory.
pub trait Store: Send + Sync + 'static {
    /// Writes one entry in its own commit; with `durable`, on disk when
    /// this returns.
    fn put(&self, key: &[u8], value: &[u8], durable: bool) -> Result<()>;
    /// Writes `items` in one commit; with `durable`, on disk when this
    /// returns.
    fn put_batch(&self, items: &[(Vec<u8>, Vec<u8>)], durable: bool) -> Result<()>;
    /// Makes every earlier commit durable.
    fn sync(&self) -> Result<()>;
    /// Reads every entry into a map.
    fn read_all(&self) -> Result<Map>;
}

/// fjall: an LSM tree with a journal. A write goes to the journal (and,
/// by default, from its buffer to the OS) and the memtable;
/// `Database::persist(SyncData)` fsyncs the journal.
pub struct Fjall {
    db: fjall::Database,
    entries: fjall::Keyspace,
}

impl Fjall {
    /// Opens (or creates) the database in `dir`, with default settings.
    pub fn open(dir: &Path) -> Result<Self> {
        let db = fjall::Database::builder(dir).open().context("fjall open")?;
        let entries = db
            .keyspace("entries", fjall::KeyspaceCreateOptions::default)
            .context("fjall keyspace")?;
        Ok(Self { db, entries })
    }
}

impl Store for Fjall {
    fn put(&self, key: &[u8], value: &[u8], durable: bool) -> Result<()> {
        self.entries.insert(key, value)?;
        if durable {
            self.db.persist(fjall::PersistMode::SyncData)?;
        }
        Ok(())
    }

    fn put_batch(&self, items: &[(Vec<u8>, Vec<u8>)], durable: bool) -> Result<()> {
        let mut batch = self.db.batch();
        if durable {
            batch = batch.durability(Some(fjall::PersistMode::SyncData));
        }
        for (key, value) in items {
            batch.insert(&self.entries, key.as_slice(), value.as_slice());
        }
        batch.commit()?;
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(self.db.persist(fjall::PersistMode::SyncData)?)
    }

    fn read_all(&self) -> Result<Map> {
        let mut map = Map::new();
        for guard in self.entries.iter() {
            let (key, value) = guard.into_inner()?;
            let (ty, key) = workload::split_key(&key);
            let entry = workload::decode(&key, &value);
            map.insert((ty, key), entry);
        }
        Ok(map)
    }
}

const TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("entries");

/// redb: copy-on-write B+trees in one file; one write transaction at a
/// time. `Durability::Immediate` (the default) fsyncs at commit,
/// `Durability::None` does not, and the next `Immediate` commit makes
/// it durable.
pub struct Redb {
    db: redb::Database,
}

impl Redb {
    /// Opens (or creates) `dir/data.redb`, with default settings.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let db = redb::Database::create(dir.join("data.redb")).context("redb open")?;
        Ok(Self { db })
    }

    fn commit(&self, items: &[(&[u8], &[u8])], durable: bool) -> Result<()> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(if durable {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        })?;
        {
            let mut table = txn.open_table(TABLE)?;
            for (key, value) in items {
                table.insert(*key, *value)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Closes the database, reporting an error a drop would ignore.
    pub fn close(self) -> Result<()> {
        Ok(self.db.close()?)
    }
}

impl Store for Redb {
    fn put(&self, key: &[u8], value: &[u8], durable: bool) -> Result<()> {
        self.commit(&[(key, value)], durable)
    }

    fn put_batch(&self, items: &[(Vec<u8>, Vec<u8>)], durable: bool) -> Result<()> {
        let items: Vec<(&[u8], &[u8])> = items
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        self.commit(&items, durable)
    }

    fn sync(&self) -> Result<()> {
        self.commit(&[], true)
    }

    fn read_all(&self) -> Result<Map> {
        use redb::{ReadableDatabase, ReadableTable};
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TABLE)?;
        let mut map = Map::new();
        for item in table.iter()? {
            let (key, value) = item?;
            let (ty, key) = workload::split_key(key.value());
            let entry = workload::decode(&key, value.value());
            map.insert((ty, key), entry);
        }
        Ok(map)
    }
}
