//! The embedded store: one redb database file on this machine, the default backend.
//!
//! redb locks the file, so only one controller can hold it; holding it makes that controller
//! the leader, which is why [`StateStore::campaign`] returns at once. Every redb call is blocking
//! (a commit syncs the file), so each operation runs on `tokio::task::spawn_blocking`; only
//! [`EmbeddedStore::open`] blocks its caller, once, at start-up. Watches are in-process: the
//! write path hands each change to the subscribers whose prefix matches.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use redb::{Builder, Database, DatabaseError, ReadableDatabase, ReadableTable, StorageError, TableDefinition};
use tokio::sync::{mpsc, watch};
use tracing::warn;

use super::{Leadership, StateStore, StateStoreError, WatchEvent};

/// The one table: keys are the store's `/`-separated keys, values the bytes given to `put`.
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");

/// The state table inside a write transaction.
type StateTable<'txn> = redb::Table<'txn, &'static str, &'static [u8]>;

/// Events a watch subscriber may have waiting. A subscriber that falls this far behind is
/// dropped (its receiver ends) rather than slowing down writers or silently missing changes.
const WATCH_BUFFER: usize = 1024;

/// redb keeps up to this much of the file cached; the controller's state is small.
const CACHE_BYTES: usize = 64 << 20;

/// The state store in a local redb file. See the module docs.
pub struct EmbeddedStore {
    inner: Arc<Inner>,
    /// The candidate given to [`StateStore::campaign`].
    leader: Mutex<Option<String>>,
    /// Turns true when the store is dropped; leadership lasts as long as the file is held.
    lost: watch::Sender<bool>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    /// Locked through each write's commit and notification, so subscribers see changes in
    /// commit order.
    watchers: Mutex<Vec<Watcher>>,
}

struct Watcher {
    prefix: String,
    tx: mpsc::Sender<WatchEvent>,
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore").field("path", &self.inner.path).finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens (creating it and its parent directories if needed) the database file at `path`.
    ///
    /// `Busy` when another controller holds the file, `Backend` when it is corrupt or not a
    /// Gantry state file, `Unavailable` when it cannot be created or read. Blocks while redb
    /// opens the file and checks its integrity.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StateStoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StateStoreError::Unavailable(format!("cannot create the state directory {}: {e}", parent.display()))
            })?;
        }
        // With the integrity check a file altered outside redb is reported as corrupt instead
        // of being trusted (a plain open may panic on one). The state is small, so it is cheap.
        let db = Builder::new()
            .set_cache_size(CACHE_BYTES)
            .set_check_integrity_on_open(true)
            .create(path)
            .map_err(|e| open_error(path, e))?;
        let create_table = || -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            txn.open_table(STATE)?;
            txn.commit()?;
            Ok(())
        };
        create_table()
            .map_err(|e| StateStoreError::Backend(format!("cannot prepare the state file {}: {e}", path.display())))?;
        let (lost, _) = watch::channel(false);
        Ok(EmbeddedStore {
            inner: Arc::new(Inner { db, path: path.to_path_buf(), watchers: Mutex::new(Vec::new()) }),
            leader: Mutex::new(None),
            lost,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` on a blocking thread; `what` names the operation in its error.
    async fn blocking<T, F>(&self, what: String, f: F) -> Result<T, StateStoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, redb::Error> + Send + 'static,
    {
        let inner = self.inner.clone();
        let path = self.inner.path.display().to_string();
        match tokio::task::spawn_blocking(move || f(&inner)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(StateStoreError::Backend(format!("embedded store {path}: {what} failed: {e}"))),
            Err(e) => Err(StateStoreError::Backend(format!("embedded store {path}: {what} did not finish: {e}"))),
        }
    }
}

/// Turns redb's open error into one line that says what to do.
fn open_error(path: &Path, e: DatabaseError) -> StateStoreError {
    let path = path.display();
    match e {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => StateStoreError::Busy(format!(
            "state file {path} is in use by another controller: stop that controller, \
             or give this one another file with --store"
        )),
        DatabaseError::Storage(StorageError::Corrupted(why)) => StateStoreError::Backend(format!(
            "state file {path} is corrupt ({why}): move it aside to start with an empty state"
        )),
        // redb's answer for a file that does not hold a redb database.
        DatabaseError::Storage(StorageError::Io(e)) if e.kind() == io::ErrorKind::InvalidData => {
            StateStoreError::Backend(format!(
                "state file {path} is not a Gantry state file or is corrupt ({e}): move it aside, \
                 or give another file with --store"
            ))
        }
        DatabaseError::Storage(StorageError::Io(e)) => {
            StateStoreError::Unavailable(format!("cannot open the state file {path}: {e}"))
        }
        e => StateStoreError::Backend(format!("cannot open the state file {path}: {e}")),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; if something did, the data is still whole.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    /// One write transaction: `change` edits the table and says which events it made; they go
    /// to the watchers after the commit, while the watcher list is still locked.
    fn write<R>(
        &self,
        change: impl FnOnce(&mut StateTable<'_>) -> Result<(R, Vec<WatchEvent>), redb::Error>,
    ) -> Result<R, redb::Error> {
        let mut watchers = lock(&self.watchers);
        let txn = self.db.begin_write()?;
        let (result, events) = {
            let mut table = txn.open_table(STATE)?;
            change(&mut table)?
        };
        txn.commit()?;
        notify(&mut watchers, &events, &self.path);
        Ok(result)
    }

    /// The keys under `prefix`, in key order.
    fn keys_under(table: &StateTable<'_>, prefix: &str) -> Result<Vec<String>, redb::Error> {
        let mut keys = Vec::new();
        for entry in table.range::<&str>(prefix..)? {
            let (key, _) = entry?;
            let key = key.value();
            if !key.starts_with(prefix) {
                break;
            }
            keys.push(key.to_string());
        }
        Ok(keys)
    }
}

/// Hands `events` to the matching watchers without waiting: a full or closed subscriber is
/// dropped, so a slow one never blocks a writer.
fn notify(watchers: &mut Vec<Watcher>, events: &[WatchEvent], path: &Path) {
    if events.is_empty() {
        return;
    }
    watchers.retain(|w| {
        for event in events {
            let key = match event {
                WatchEvent::Put { key, .. } | WatchEvent::Delete { key } => key,
            };
            if !key.starts_with(&w.prefix) {
                continue;
            }
            match w.tx.try_send(event.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    warn!(
                        store = %path.display(),
                        prefix = %w.prefix,
                        buffered = WATCH_BUFFER,
                        "watch subscriber is too far behind; ending its watch"
                    );
                    return false;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        true
    });
}

#[async_trait]
impl StateStore for EmbeddedStore {
    fn describe(&self) -> String {
        format!("embedded ({})", self.inner.path.display())
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StateStoreError> {
        let k = key.to_string();
        self.blocking(format!("get {key}"), move |inner| {
            let txn = inner.db.begin_read()?;
            let table = txn.open_table(STATE)?;
            Ok(table.get(k.as_str())?.map(|v| v.value().to_vec()))
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StateStoreError> {
        let p = prefix.to_string();
        self.blocking(format!("list {prefix}"), move |inner| {
            let txn = inner.db.begin_read()?;
            let table = txn.open_table(STATE)?;
            let mut out = Vec::new();
            for entry in table.range::<&str>(p.as_str()..)? {
                let (key, value) = entry?;
                let key = key.value();
                if !key.starts_with(&p) {
                    break;
                }
                out.push((key.to_string(), value.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StateStoreError> {
        let k = key.to_string();
        self.blocking(format!("put {key}"), move |inner| {
            inner.write(|table| {
                table.insert(k.as_str(), value.as_slice())?;
                Ok(((), vec![WatchEvent::Put { key: k, value }]))
            })
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool, StateStoreError> {
        let k = key.to_string();
        self.blocking(format!("delete {key}"), move |inner| {
            inner.write(|table| {
                let existed = table.remove(k.as_str())?.is_some();
                let events = if existed { vec![WatchEvent::Delete { key: k }] } else { Vec::new() };
                Ok((existed, events))
            })
        })
        .await
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StateStoreError> {
        let p = prefix.to_string();
        self.blocking(format!("delete everything under {prefix}"), move |inner| {
            inner.write(|table| {
                let keys = Inner::keys_under(table, &p)?;
                for key in &keys {
                    table.remove(key.as_str())?;
                }
                let count = keys.len() as u64;
                Ok((count, keys.into_iter().map(|key| WatchEvent::Delete { key }).collect()))
            })
        })
        .await
    }

    async fn watch(&self, prefix: &str) -> Result<mpsc::Receiver<WatchEvent>, StateStoreError> {
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let prefix = prefix.to_string();
        // Registered under the watcher lock, which writers hold through commit: every change
        // committed after this returns reaches the subscriber. On a blocking thread because a
        // writer may hold the lock through a file sync.
        self.blocking(format!("watch {prefix}"), move |inner| {
            lock(&inner.watchers).push(Watcher { prefix, tx });
            Ok(())
        })
        .await?;
        Ok(rx)
    }

    /// Returns at once: holding the file already makes this process the only controller.
    async fn campaign(&self, candidate: &str) -> Result<Leadership, StateStoreError> {
        *lock(&self.leader) = Some(candidate.to_string());
        Ok(Leadership { lost: self.lost.subscribe() })
    }

    async fn leader(&self) -> Result<Option<String>, StateStoreError> {
        Ok(lock(&self.leader).clone())
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // The file is released with the store, and leadership with it.
        self.lost.send_replace(true);
    }
}
