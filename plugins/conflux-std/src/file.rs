//! `file` input (NDJSON or lines, optionally followed).

use std::path::PathBuf;
use std::time::Duration;

use crate::codec::{Codec, LineReader};
use conflux_api::config::Duration as ConfigDuration;
use conflux_api::{
    async_trait, inventory, BuildContext, BuildError, BuiltInput, Emitter, Input, InputConfig, PluginError,
    Registration,
};
use schemars::JsonSchema;
use serde::Deserialize;

fn default_batch_size() -> usize {
    1024
}

fn default_poll() -> ConfigDuration {
    ConfigDuration::from_millis(200)
}

/// Reads events from a file, one per line: NDJSON by default.
///
/// The input ends at the end of the file unless `follow` is set, in which
/// case it waits for appended lines like `tail -F`: a last line without its
/// newline is held until the newline arrives (a writer may append a line in
/// several writes), a file renamed away (rotation) is read to its end and the
/// new file at the path is read from its start, and a file that shrank
/// (truncation, `copytruncate`) is read again from its start. Lines that are
/// not valid JSON go to the `invalid` port with the line number and reason.
/// A missing file is an error at start, unless followed (then it is waited for).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileInputConfig {
    /// File to read, relative to the pipeline file.
    pub path: String,
    /// How lines become events (default `json`).
    #[serde(default)]
    pub codec: Codec,
    /// Keep reading lines appended after the end of the file.
    #[serde(default)]
    pub follow: bool,
    /// How often a followed file is checked for new lines.
    #[serde(default = "default_poll")]
    pub poll_interval: ConfigDuration,
    /// Most events per batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

impl InputConfig for FileInputConfig {
    const TYPE: &'static str = "file";
    fn build(self, cx: &BuildContext) -> Result<BuiltInput, BuildError> {
        if self.batch_size == 0 {
            return Err(BuildError::at(["batch_size"], "batch_size must be at least 1"));
        }
        Ok(BuiltInput::new(FileInput {
            path: cx.resolve(&self.path),
            config: self,
            reader: None,
            identity: None,
            rotated: false,
        })
        .with_ports(&["invalid"]))
    }
}

inventory::submit!(Registration::input::<FileInputConfig>());

struct FileInput {
    path: PathBuf,
    config: FileInputConfig,
    reader: Option<LineReader<tokio::fs::File>>,
    /// Device and inode of the open file: another one at the path means it was rotated.
    identity: Option<(u64, u64)>,
    /// Rotation seen: the old file gets one more read to its end before the switch.
    rotated: bool,
}

/// A file's device and inode.
fn identity_of(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

impl FileInput {
    async fn open(&self) -> Result<(tokio::fs::File, (u64, u64)), PluginError> {
        let failed = |e: std::io::Error| {
            let message = format!("cannot open {}", self.path.display());
            // Without `follow` nothing will make a missing file appear: fail at start.
            if e.kind() == std::io::ErrorKind::NotFound && !self.config.follow {
                PluginError::fatal(format!("{message}: the file does not exist"))
            } else {
                PluginError::retryable_from(message, e)
            }
        };
        let file = tokio::fs::File::open(&self.path).await.map_err(failed)?;
        let meta = file.metadata().await.map_err(failed)?;
        if !meta.is_file() && !self.config.follow {
            return Err(PluginError::fatal(format!("{} is not a regular file", self.path.display())));
        }
        Ok((file, identity_of(&meta)))
    }

    /// At the end of a followed file: whether the path now names another
    /// file (rotation) or the file shrank below what was read (truncation);
    /// if so, goes on from the start of the file at the path.
    async fn check_replaced(&mut self) -> Result<(), PluginError> {
        let Ok(meta) = tokio::fs::metadata(&self.path).await else {
            return Ok(()); // Renamed away, not yet created again: keep waiting.
        };
        let Some(reader) = self.reader.as_mut() else { return Ok(()) };
        let replaced = Some(identity_of(&meta)) != self.identity;
        let truncated = !replaced && meta.len() < reader.bytes_read();
        if replaced && !self.rotated {
            // Lines the writer appended just before the rename: read them first.
            self.rotated = true;
            return Ok(());
        }
        if replaced || truncated {
            let (file, identity) = self.open().await?;
            tracing::info!(path = %self.path.display(), rotated = replaced, truncated, "file replaced; reading it from the start");
            if let Some(reader) = self.reader.as_mut() {
                reader.reopen(file);
            }
            self.identity = Some(identity);
            self.rotated = false;
        }
        Ok(())
    }
}

#[async_trait]
impl Input for FileInput {
    async fn connect(&mut self) -> Result<(), PluginError> {
        if self.reader.is_none() {
            let (file, identity) = self.open().await?;
            let stream = format!("file:{}", self.path.display());
            let mut reader = LineReader::new(file, self.config.codec, self.config.batch_size).with_positions(stream);
            if self.config.follow {
                reader = reader.holding_partial_lines();
            }
            self.reader = Some(reader);
            self.identity = Some(identity);
        }
        Ok(())
    }

    async fn read(&mut self, out: &mut Emitter) -> Result<bool, PluginError> {
        let source = self.path.display().to_string();
        loop {
            let reader = self.reader.as_mut().ok_or_else(|| PluginError::not_connected("file not open"))?;
            reader
                .read_batch(out, &source)
                .await
                .map_err(|e| PluginError::retryable_from(format!("cannot read {source}"), e))?;
            if !reader.finished() {
                return Ok(true);
            }
            if !self.config.follow {
                return Ok(false);
            }
            if !out.is_empty() {
                return Ok(true);
            }
            tokio::time::sleep(self.config.poll_interval.0).await;
            self.check_replaced().await?;
            if let Some(reader) = self.reader.as_mut() {
                reader.resume();
            }
        }
    }
}

/// How long `drop` waits per batch when asked to act slow.
pub(crate) fn as_std(d: Option<ConfigDuration>) -> Option<Duration> {
    d.map(|d| d.0).filter(|d| !d.is_zero())
}
