//! Where stateful stages keep durable snapshots: a file in the pipeline's
//! `data_dir` (embedded, the default) or a Redis key (shared, survives the host).
//!
//! A snapshot is written whole and replaces the previous one atomically
//! (temporary file, fsync, rename; one Redis `SET`), so a crash at any point
//! leaves either the old snapshot or the new one, never a torn mix.

use std::path::{Path, PathBuf};

use conflux_redis::RedisConn;

/// A snapshot could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
    #[error("redis {url} key {key}: {source}")]
    Redis { url: String, key: String, source: redis::RedisError },
}

/// One durable slot holding the latest snapshot.
pub enum Store {
    File(PathBuf),
    Redis { conn: Box<RedisConn>, key: String },
}

impl Store {
    /// A file store at `path` (its folder is created on first save).
    pub fn file(path: PathBuf) -> Self {
        Store::File(path)
    }

    /// A Redis store; the URL is checked now, the connection opened on first use.
    pub fn redis(url: &str, key: String) -> Result<Self, redis::RedisError> {
        Ok(Store::Redis { conn: Box::new(RedisConn::open(url)?), key })
    }

    /// Where snapshots go, for logs (passwords removed).
    pub fn describe(&self) -> String {
        match self {
            Store::File(path) => path.display().to_string(),
            Store::Redis { conn, key } => format!("{} key {key}", conn.url()),
        }
    }

    /// The latest snapshot, if one was ever written.
    pub async fn load(&mut self) -> Result<Option<Vec<u8>>, CheckpointError> {
        match self {
            Store::File(path) => {
                let path = path.clone();
                match tokio::fs::read(&path).await {
                    Ok(bytes) => Ok(Some(bytes)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(source) => Err(CheckpointError::File { path, source }),
                }
            }
            Store::Redis { .. } => {
                let result = self.redis_query(redis::cmd("GET").arg(self.key())).await;
                result.map(|v: Option<Vec<u8>>| v)
            }
        }
    }

    /// Replaces the snapshot; returns once it is durable.
    pub async fn save(&mut self, bytes: Vec<u8>) -> Result<(), CheckpointError> {
        match self {
            Store::File(path) => {
                let path = path.clone();
                let target = path.clone();
                tokio::task::spawn_blocking(move || write_atomically(&target, &bytes))
                    .await
                    .unwrap_or_else(|join| Err(std::io::Error::other(join.to_string())))
                    .map_err(|source| CheckpointError::File { path, source })
            }
            Store::Redis { .. } => {
                let key = self.key();
                self.redis_query::<()>(redis::cmd("SET").arg(key).arg(bytes)).await
            }
        }
    }

    fn key(&self) -> String {
        match self {
            Store::File(_) => String::new(),
            Store::Redis { key, .. } => key.clone(),
        }
    }

    async fn redis_query<T: redis::FromRedisValue>(&mut self, cmd: &mut redis::Cmd) -> Result<T, CheckpointError> {
        let Store::Redis { conn, key } = self else { unreachable!("only called on the Redis store") };
        conn.query(cmd).await.map_err(|source| CheckpointError::Redis {
            url: conn.url().to_string(),
            key: key.clone(),
            source,
        })
    }
}

/// Writes `bytes` to `path` so that readers see the old or the new content, never a mix.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    // The rename itself must reach the disk before the snapshot counts as durable.
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_the_description() {
        let store = Store::redis("redis://:hunter2@127.0.0.1:6379", "k".into()).unwrap();
        assert!(!store.describe().contains("hunter2"), "{}", store.describe());
    }

    #[tokio::test]
    async fn file_store_replaces_whole_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::file(dir.path().join("nested/agg.checkpoint"));
        assert_eq!(store.load().await.unwrap(), None);
        store.save(b"first".to_vec()).await.unwrap();
        store.save(b"second".to_vec()).await.unwrap();
        assert_eq!(store.load().await.unwrap().as_deref(), Some(&b"second"[..]));
        assert!(!dir.path().join("nested/agg.tmp").exists(), "temporary file renamed away");
    }

    #[tokio::test]
    async fn redis_store_round_trips() {
        let key = format!("conflux-test:checkpoint:{}", std::process::id());
        let mut store = Store::redis("redis://127.0.0.1:6379", key.clone()).unwrap();
        let loaded = store.load().await.unwrap_or_else(|e| {
            panic!("Redis must run on 127.0.0.1:6379 for this test (scripts/services.sh starts it): {e}")
        });
        assert_eq!(loaded, None);
        store.save(b"snapshot".to_vec()).await.unwrap();
        assert_eq!(store.load().await.unwrap().as_deref(), Some(&b"snapshot"[..]));
        let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("DEL").arg(&key).query_async(&mut conn).await.unwrap();
    }

    #[tokio::test]
    async fn unreachable_redis_is_a_clear_error() {
        let mut store = Store::redis("redis://127.0.0.1:1", "k".into()).unwrap();
        let error = store.save(b"x".to_vec()).await.unwrap_err().to_string();
        assert!(error.contains("redis redis://127.0.0.1:1 key k"), "{error}");
    }
}
