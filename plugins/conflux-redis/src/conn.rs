//! The connection holder shared by every component that talks to Redis
//! (aggregate checkpoints, dedupe, and the Redis output and input): it
//! connects on first use, drops the connection after any error so the next
//! call reconnects, and can retry a call with backoff within a time budget.
//! Its URL is shown with the password masked: URLs end up in logs.

use std::time::{Duration, Instant};

use conflux_api::Backoff;
use redis::aio::MultiplexedConnection;
use redis::{FromRedisValue, RedisError};
use tracing::debug;

/// A lazily opened, self-healing connection to one Redis server.
pub struct RedisConn {
    client: redis::Client,
    shown: String,
    conn: Option<MultiplexedConnection>,
}

impl RedisConn {
    /// Checks the URL (`redis://`, `rediss://`, user and password); opens nothing.
    pub fn open(url: &str) -> Result<Self, RedisError> {
        Ok(RedisConn {
            client: redis::Client::open(url)?,
            shown: conflux_api::secrets::mask_url_passwords(url.into()).into_owned(),
            conn: None,
        })
    }

    /// The URL with its password masked, for logs and errors.
    pub fn url(&self) -> &str {
        &self.shown
    }

    /// Forgets the connection: the next call opens a fresh one.
    pub fn reset(&mut self) {
        self.conn = None;
    }

    /// Whether a connection is open (it may still be broken until used).
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// The connection, opened first if needed.
    pub async fn connection(&mut self) -> Result<&mut MultiplexedConnection, RedisError> {
        if self.conn.is_none() {
            self.conn = Some(self.client.get_multiplexed_async_connection().await?);
        }
        Ok(self.conn.as_mut().expect("opened above"))
    }

    /// Runs one command; after an error the next call reconnects.
    pub async fn query<T: FromRedisValue>(&mut self, cmd: &redis::Cmd) -> Result<T, RedisError> {
        let result = match self.connection().await {
            Ok(conn) => cmd.query_async(conn).await,
            Err(e) => Err(e),
        };
        self.reset_on_error(result)
    }

    /// Runs a pipeline (one round trip); after an error the next call reconnects.
    pub async fn query_pipe<T: FromRedisValue>(&mut self, pipe: &redis::Pipeline) -> Result<T, RedisError> {
        let result = match self.connection().await {
            Ok(conn) => pipe.query_async(conn).await,
            Err(e) => Err(e),
        };
        self.reset_on_error(result)
    }

    /// Runs a pipeline, retrying with `backoff` while the next wait still
    /// fits in `budget`; the last error once it does not.
    pub async fn query_pipe_retrying<T: FromRedisValue>(
        &mut self,
        pipe: &redis::Pipeline,
        backoff: Backoff,
        budget: Duration,
    ) -> Result<T, RedisError> {
        let started = Instant::now();
        let mut failures = 0;
        loop {
            match self.query_pipe(pipe).await {
                Ok(value) => return Ok(value),
                Err(e) => {
                    failures += 1;
                    let wait = backoff.wait(failures);
                    if started.elapsed() + wait > budget {
                        return Err(e);
                    }
                    debug!(url = %self.shown, error = %e, retry_in = ?wait, "Redis call failed; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    fn reset_on_error<T>(&mut self, result: Result<T, RedisError>) -> Result<T, RedisError> {
        if result.is_err() {
            // The connection may be what broke: open a fresh one next time.
            self.conn = None;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked() {
        let shown = |url: &str| RedisConn::open(url).unwrap().url().to_string();
        assert_eq!(shown("redis://app:hunter2@cache:6379/0"), "redis://app:***@cache:6379/0");
        assert_eq!(shown("redis://:hunter2@cache"), "redis://:***@cache");
        assert_eq!(shown("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(RedisConn::open("redis://u:pw@127.0.0.1:6380").unwrap().url(), "redis://u:***@127.0.0.1:6380");
    }

    #[tokio::test]
    async fn reconnects_after_the_connection_breaks() {
        let mut conn = RedisConn::open("redis://127.0.0.1:6379").unwrap();
        let pong: String =
            conn.query(&redis::cmd("PING")).await.expect("Redis on 127.0.0.1:6379 (scripts/test.sh starts it)");
        assert_eq!(pong, "PONG");
        // Have the server close our connection (only ours: the server is shared
        // with other tests); the call after that finds it broken, the next reconnects.
        let id: i64 = conn.query(redis::cmd("CLIENT").arg("ID")).await.unwrap();
        let _: Result<(), _> = conn.query(redis::cmd("CLIENT").arg("KILL").arg("ID").arg(id)).await;
        let _ = conn.query::<String>(&redis::cmd("PING")).await;
        let pong: String = conn.query(&redis::cmd("PING")).await.expect("reconnected");
        assert_eq!(pong, "PONG");
    }

    #[tokio::test]
    async fn retries_give_up_within_the_budget() {
        let mut conn = RedisConn::open("redis://127.0.0.1:1").unwrap();
        let started = Instant::now();
        let backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(100));
        let result: Result<(), _> =
            conn.query_pipe_retrying(redis::pipe().cmd("PING"), backoff, Duration::from_millis(300)).await;
        assert!(result.is_err());
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        assert!(!conn.is_connected());
    }
}
