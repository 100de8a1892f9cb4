//! Reading streams in a consumer group: `XREADGROUP`, with the group made
//! when missing, this consumer's own pending entries read again after every
//! connect, and entries idle in the pending list for `claim_after` (a
//! crashed consumer's, or ones the pipeline failed) claimed with `XAUTOCLAIM`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use conflux_api::metrics::Counter;
use conflux_api::{async_trait, Emitter, Event, Input, PluginError, Timestamp, Value};
use redis::RedisError;

use super::acks::{self, Acks, Outstanding};
use super::entries::{self, Entry, NOT_JSON};
use super::{StartAt, INVALID};
use crate::RedisConn;

/// The stream options, checked and with their defaults.
pub(super) struct StreamSettings {
    pub streams: Vec<String>,
    pub group: String,
    pub consumer: String,
    pub start: StartAt,
    pub field: String,
    pub batch_size: usize,
    pub block: Duration,
    pub claim_after: Duration,
    pub max_unacked: usize,
}

pub(super) struct StreamReader {
    s: StreamSettings,
    /// Blocks in `XREADGROUP`; acknowledgements go on a connection of their own.
    conn: RedisConn,
    /// Taken by the acknowledging task at the first connect.
    ack_conn: Option<RedisConn>,
    acks: Option<Acks>,
    outstanding: Arc<Outstanding>,
    /// `redis:<stream>`, the position stream of each stream's events.
    positions: Vec<Arc<str>>,
    /// Per stream, while its own pending entries are read again after a
    /// connect: the id to read on from (`0` at first).
    history: Vec<Option<String>>,
    /// Per stream, where the `XAUTOCLAIM` scan of the pending list goes on.
    claim_cursors: Vec<String>,
    next_claim: Instant,
    claimed: Counter,
}

impl StreamReader {
    pub fn new(s: StreamSettings, conn: RedisConn, ack_conn: RedisConn, claimed: Counter) -> Self {
        let n = s.streams.len();
        StreamReader {
            positions: s.streams.iter().map(|name| Arc::from(format!("redis:{name}"))).collect(),
            history: vec![None; n],
            claim_cursors: vec!["0-0".into(); n],
            next_claim: Instant::now(),
            s,
            conn,
            ack_conn: Some(ack_conn),
            acks: None,
            outstanding: Arc::default(),
            claimed,
        }
    }

    /// How often the pending lists are scanned for idle entries.
    fn claim_interval(&self) -> Duration {
        (self.s.claim_after / 2).clamp(Duration::from_millis(50), Duration::from_secs(5))
    }

    /// One `XAUTOCLAIM` per stream from where the last scan stopped; the
    /// next scan is due at once while a stream's scan is unfinished.
    async fn claim(&mut self, room: usize, acks: &Acks, out: &mut Emitter) -> Result<usize, PluginError> {
        let mut emitted = 0;
        let mut unfinished = false;
        let idle = self.s.claim_after.as_millis().min(u64::MAX as u128) as u64;
        for i in 0..self.s.streams.len() {
            let claim = redis::cmd("XAUTOCLAIM")
                .arg(&self.s.streams[i])
                .arg(&self.s.group)
                .arg(&self.s.consumer)
                .arg(idle)
                .arg(&self.claim_cursors[i])
                .arg("COUNT")
                .arg(room)
                .clone();
            let reply = self.conn.query(&claim).await.map_err(|e| read_error(&self.conn, e))?;
            let (cursor, claimed) = entries::autoclaim_reply(reply).map_err(PluginError::retryable)?;
            unfinished |= cursor != "0-0";
            self.claim_cursors[i] = cursor;
            let taken = self.hand_on(i, claimed, acks, out);
            if taken > 0 {
                self.claimed.inc_by(taken as u64);
                tracing::info!(stream = %self.s.streams[i], entries = taken, "claimed idle pending entries");
            }
            emitted += taken;
        }
        self.next_claim = if unfinished { Instant::now() } else { Instant::now() + self.claim_interval() };
        Ok(emitted)
    }

    /// This consumer's own pending entries, from the streams still reading them.
    async fn read_history(&mut self, room: usize, acks: &Acks, out: &mut Emitter) -> Result<usize, PluginError> {
        let reading: Vec<usize> = (0..self.s.streams.len()).filter(|&i| self.history[i].is_some()).collect();
        let mut read = self.read_group(room, None);
        read.arg(reading.iter().map(|&i| &self.s.streams[i]).collect::<Vec<_>>());
        read.arg(reading.iter().map(|&i| self.history[i].as_deref().unwrap_or("0")).collect::<Vec<_>>());
        let reply = self.conn.query(&read).await.map_err(|e| read_error(&self.conn, e))?;
        let mut replies = entries::read_reply(reply).map_err(PluginError::retryable)?;
        let mut emitted = 0;
        for i in reading {
            let name = self.s.streams[i].as_bytes();
            let found = replies.iter().position(|(n, _)| n == name).map(|at| replies.swap_remove(at).1);
            match found.as_ref().and_then(|entries| entries.last()) {
                Some(last) => self.history[i] = Some(last.id.clone()),
                // Nothing more pending for this consumer: on to new entries.
                None => self.history[i] = None,
            }
            emitted += self.hand_on(i, found.unwrap_or_default(), acks, out);
        }
        Ok(emitted)
    }

    /// New entries (`>`), waiting up to `block` (or until claims are due).
    async fn read_new(&mut self, room: usize, acks: &Acks, out: &mut Emitter) -> Result<usize, PluginError> {
        let until_claim = self.next_claim.saturating_duration_since(Instant::now());
        let block = self.s.block.min(until_claim).max(Duration::from_millis(1));
        let mut read = self.read_group(room, Some(block));
        read.arg(&self.s.streams).arg(vec![">"; self.s.streams.len()]);
        // The read waits in Redis for `block`: the client must wait longer than that.
        let opened = self.conn.connection().await.map(|c| c.set_response_timeout(block + Duration::from_secs(5)));
        opened.map_err(|e| connect_error(&self.conn, "cannot connect", e))?;
        let reply = self.conn.query(&read).await.map_err(|e| read_error(&self.conn, e))?;
        let replies = entries::read_reply(reply).map_err(PluginError::retryable)?;
        let mut emitted = 0;
        for (name, found) in replies {
            let Some(i) = self.s.streams.iter().position(|s| s.as_bytes() == name) else { continue };
            emitted += self.hand_on(i, found, acks, out);
        }
        Ok(emitted)
    }

    fn read_group(&self, count: usize, block: Option<Duration>) -> redis::Cmd {
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP").arg(&self.s.group).arg(&self.s.consumer).arg("COUNT").arg(count);
        if let Some(block) = block {
            read.arg("BLOCK").arg(block.as_millis().min(u64::MAX as u128) as u64);
        }
        read.arg("STREAMS");
        read
    }

    /// Emits the entries not already outstanding, each with its own token;
    /// how many. Trimmed entries are acknowledged at once: there is nothing to deliver.
    fn hand_on(&self, stream: usize, found: Vec<Entry>, acks: &Acks, out: &mut Emitter) -> usize {
        let now = Timestamp::now();
        let mut emitted = 0;
        for Entry { id, fields } in found {
            if !self.outstanding.insert((stream, id.clone())) {
                continue;
            }
            let Some(fields) = fields else {
                tracing::debug!(stream = %self.s.streams[stream], id = %id, "a pending entry was trimmed from the stream");
                acks.settle_now((stream, id));
                continue;
            };
            let (data, valid) = match entries::payload(fields, &self.s.field) {
                Ok(data) => (data, true),
                Err(text) => (text, false),
            };
            let mut event = Event::with_time(data, now);
            if let Some(offset) = entries::offset(&id) {
                // Ids only grow within a stream: the position checkpointing stages compare.
                event = event.at(&self.positions[stream], offset);
            }
            event.meta.insert("redis.stream", Value::from(self.s.streams[stream].as_str()));
            event.meta.insert("redis.id", Value::from(id.as_str()));
            let event = event.with_ack(acks.token((stream, id)));
            if valid {
                out.emit(event);
            } else {
                let mut event = event;
                event.meta.insert(conflux_api::component::ERROR_META, Value::from(NOT_JSON));
                out.emit_to(INVALID, event);
            }
            emitted += 1;
        }
        emitted
    }
}

#[async_trait]
impl Input for StreamReader {
    async fn connect(&mut self) -> Result<(), PluginError> {
        if let Some(conn) = self.ack_conn.take() {
            let streams: Arc<[String]> = self.s.streams.clone().into();
            self.acks = Some(acks::start(conn, self.s.group.clone(), streams, self.outstanding.clone()));
        }
        self.conn.reset();
        let start = match self.s.start {
            StartAt::All => "0",
            StartAt::New => "$",
        };
        for stream in &self.s.streams {
            let create =
                redis::cmd("XGROUP").arg("CREATE").arg(stream).arg(&self.s.group).arg(start).arg("MKSTREAM").clone();
            match self.conn.query::<()>(&create).await {
                Ok(()) => tracing::info!(stream = %stream, group = %self.s.group, "consumer group created"),
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => {
                    return Err(connect_error(&self.conn, &format!("cannot create group on stream `{stream}`"), e))
                }
            }
        }
        // Entries this consumer was given and never acknowledged (by an earlier
        // run, or lost in a broken connection) come first.
        self.history.iter_mut().for_each(|h| *h = Some("0".into()));
        Ok(())
    }

    async fn read(&mut self, out: &mut Emitter) -> Result<bool, PluginError> {
        let acks = self.acks.clone().ok_or_else(|| PluginError::not_connected("not connected"))?;
        loop {
            self.outstanding.below(self.s.max_unacked).await;
            let room = self.s.batch_size.min(self.s.max_unacked.saturating_sub(self.outstanding.len())).max(1);
            if Instant::now() >= self.next_claim && self.claim(room, &acks, out).await? > 0 {
                return Ok(true);
            }
            let emitted = if self.history.iter().any(Option::is_some) {
                self.read_history(room, &acks, out).await?
            } else {
                self.read_new(room, &acks, out).await?
            };
            if emitted > 0 {
                return Ok(true);
            }
        }
    }

    /// Waits a while for the pipeline to settle what is outstanding, so its
    /// acknowledgements are sent before the process ends.
    async fn close(&mut self) {
        let drained = self.outstanding.below(1);
        if tokio::time::timeout(Duration::from_secs(10), drained).await.is_err() {
            tracing::warn!(
                entries = self.outstanding.len(),
                "closing with entries unacknowledged; they stay pending and are claimed again"
            );
        }
    }
}

/// Errors that retrying cannot mend (a key of another type, a missing
/// permission, a wrong password) end the input; the rest reconnect.
fn connect_error(conn: &RedisConn, what: &str, e: RedisError) -> PluginError {
    let passing = matches!(e.code(), Some("LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN" | "CLUSTERDOWN"));
    if e.code().is_some() && !passing {
        PluginError::fatal(format!("Redis at {}: {what}: {e}", conn.url()))
    } else {
        PluginError::not_connected(format!("Redis at {}: {what}: {e}", conn.url()))
    }
}

/// A failed read reconnects, which also makes the group again if it was
/// removed (`NOGROUP`) and ends the input if the key became another type.
fn read_error(conn: &RedisConn, e: RedisError) -> PluginError {
    PluginError::not_connected(format!("Redis at {}: read failed: {e}", conn.url()))
}
