//! `file` input (NDJSON or lines, optionally followed) and `file` output (JSON lines).

use std::path::PathBuf;
use std::time::Duration;

use conflux_api::config::Duration as ConfigDuration;
use conflux_api::{
    async_trait, inventory, Batch, BuildContext, BuildError, BuiltInput, Emitter, Input, InputConfig, Output,
    OutputConfig, PluginError, Registration,
};
use schemars::JsonSchema;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use crate::codec::{write_json_line, Codec, LineReader};

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

/// Appends events to a file as JSON lines, one payload per line.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileOutputConfig {
    /// File to write, relative to the pipeline file; created with its folders if missing.
    pub path: String,
    /// Append to an existing file (default) or truncate it at start.
    #[serde(default = "yes")]
    pub append: bool,
    /// fsync after every batch: slower, but an acknowledged event survives a power cut.
    #[serde(default)]
    pub sync: bool,
}

fn yes() -> bool {
    true
}

impl OutputConfig for FileOutputConfig {
    const TYPE: &'static str = "file";
    fn build(self, cx: &BuildContext) -> Result<Box<dyn Output>, BuildError> {
        Ok(Box::new(FileOutput { path: cx.resolve(&self.path), config: self, file: tokio::sync::Mutex::new(None) }))
    }
}

inventory::submit!(Registration::output::<FileOutputConfig>());

struct FileOutput {
    path: PathBuf,
    config: FileOutputConfig,
    /// Held across a write: lines of concurrent writes never interleave.
    file: tokio::sync::Mutex<Option<tokio::fs::File>>,
}

#[async_trait]
impl Output for FileOutput {
    async fn connect(&mut self) -> Result<(), PluginError> {
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| PluginError::retryable_from(format!("cannot create {}", parent.display()), e))?;
        }
        let mut options = tokio::fs::OpenOptions::new();
        options.create(true).write(true);
        if self.config.append {
            options.append(true);
        } else {
            options.truncate(true);
        }
        let file = options
            .open(&self.path)
            .await
            .map_err(|e| PluginError::retryable_from(format!("cannot open {}", self.path.display()), e))?;
        *self.file.get_mut() = Some(file);
        Ok(())
    }

    async fn write(&self, batch: &Batch) -> Result<(), PluginError> {
        let mut buf = Vec::new();
        for event in batch {
            write_json_line(&mut buf, &event.data);
        }
        let mut file = self.file.lock().await;
        let file = file.as_mut().ok_or_else(|| PluginError::not_connected("file not open"))?;
        let failed = |e: std::io::Error| PluginError::NotConnected {
            message: format!("cannot write {}", self.path.display()),
            source: Some(Box::new(e)),
        };
        file.write_all(&buf).await.map_err(failed)?;
        file.flush().await.map_err(failed)?;
        if self.config.sync {
            file.sync_data().await.map_err(failed)?;
        }
        Ok(())
    }

    async fn close(&mut self) -> Result<(), PluginError> {
        if let Some(file) = self.file.get_mut().as_mut() {
            file.flush().await.map_err(|e| PluginError::fatal_from("flush failed", e))?;
        }
        Ok(())
    }
}

/// How long `drop` waits per batch when asked to act slow.
pub(crate) fn as_std(d: Option<ConfigDuration>) -> Option<Duration> {
    d.map(|d| d.0).filter(|d| !d.is_zero())
}
