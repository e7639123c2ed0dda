//! The controller's state store: one `StateStore` trait, two backends. (Model files are
//! `gantry-store`'s, a different thing.)
//!
//! * [`embedded::EmbeddedStore`] — a database file on this machine (redb), the default:
//!   nothing to install. Only one controller can hold the file; holding it makes it the leader.
//! * [`etcd::EtcdStore`] — etcd (`--etcd URL`), for several controllers: keys live under a
//!   prefix, leadership is an etcd election on a lease.
//!
//! Keys are `/`-separated strings (`deployments/llama`, `placements/llama/0`); values are
//! opaque bytes (the controller writes JSON). Both backends give the same answers, and the
//! same tests run against both (`controller/tests/store.rs`, etcd being a real server).

pub mod embedded;
pub mod etcd;

use std::fmt;

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};

/// A store failure, said so a user can act on it.
#[derive(Debug, thiserror::Error)]
pub enum StateStoreError {
    /// The backend cannot be reached or refused (etcd down, file unreadable).
    #[error("{0}")]
    Unavailable(String),
    /// Another controller holds what this one needs (the embedded file, leadership).
    #[error("{0}")]
    Busy(String),
    /// Anything else the backend reported.
    #[error("{0}")]
    Backend(String),
}

/// A change under a watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

/// This controller's leadership: `lost` turns true when it ends (lease expired, store gone).
#[derive(Debug)]
pub struct Leadership {
    pub lost: watch::Receiver<bool>,
}

/// Durable key-value state with prefix listing, a watch, and leader election.
#[async_trait]
pub trait StateStore: Send + Sync + fmt::Debug + 'static {
    /// `embedded (PATH)` or `etcd (URL, prefix P)`, for logs and `gantry up`'s banner.
    fn describe(&self) -> String;
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StateStoreError>;
    /// Every key starting with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StateStoreError>;
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StateStoreError>;
    /// Whether the key existed.
    async fn delete(&self, key: &str) -> Result<bool, StateStoreError>;
    /// Removes every key under `prefix`; how many there were.
    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StateStoreError>;
    /// Changes under `prefix` made after this call, in order, until the receiver is dropped.
    async fn watch(&self, prefix: &str) -> Result<mpsc::Receiver<WatchEvent>, StateStoreError>;
    /// Waits until this controller (`candidate`, e.g. its address) leads, then returns.
    async fn campaign(&self, candidate: &str) -> Result<Leadership, StateStoreError>;
    /// The current leader's candidate string, if any.
    async fn leader(&self) -> Result<Option<String>, StateStoreError>;
}
