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
/// case it waits for appended lines like `tail -f`. Lines that are not valid
/// JSON go to the `invalid` port with the line number and reason.
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
        Ok(BuiltInput::new(FileInput { path: cx.resolve(&self.path), config: self, reader: None })
            .with_ports(&["invalid"]))
    }
}

inventory::submit!(Registration::input::<FileInputConfig>());

struct FileInput {
    path: PathBuf,
    config: FileInputConfig,
    reader: Option<LineReader<tokio::fs::File>>,
}

#[async_trait]
impl Input for FileInput {
    async fn connect(&mut self) -> Result<(), PluginError> {
        if self.reader.is_none() {
            let file = tokio::fs::File::open(&self.path)
                .await
                .map_err(|e| PluginError::retryable_from(format!("cannot open {}", self.path.display()), e))?;
            let stream = format!("file:{}", self.path.display());
            self.reader = Some(LineReader::new(file, self.config.codec, self.config.batch_size).with_positions(stream));
        }
        Ok(())
    }

    async fn read(&mut self, out: &mut Emitter) -> Result<bool, PluginError> {
        let source = self.path.display().to_string();
        let reader = self.reader.as_mut().ok_or_else(|| PluginError::not_connected("file not open"))?;
        loop {
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
            reader.resume();
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
        Ok(Box::new(FileOutput { path: cx.resolve(&self.path), config: self, file: None, buf: Vec::new() }))
    }
}

inventory::submit!(Registration::output::<FileOutputConfig>());

struct FileOutput {
    path: PathBuf,
    config: FileOutputConfig,
    file: Option<tokio::fs::File>,
    buf: Vec<u8>,
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
        self.file = Some(file);
        Ok(())
    }

    async fn write(&mut self, batch: &Batch) -> Result<(), PluginError> {
        let file = self.file.as_mut().ok_or_else(|| PluginError::not_connected("file not open"))?;
        self.buf.clear();
        for event in batch {
            write_json_line(&mut self.buf, &event.data);
        }
        let failed = |e: std::io::Error| PluginError::NotConnected {
            message: format!("cannot write {}", self.path.display()),
            source: Some(Box::new(e)),
        };
        file.write_all(&self.buf).await.map_err(failed)?;
        file.flush().await.map_err(failed)?;
        if self.config.sync {
            file.sync_data().await.map_err(failed)?;
        }
        Ok(())
    }

    async fn close(&mut self) -> Result<(), PluginError> {
        if let Some(file) = self.file.as_mut() {
            file.flush().await.map_err(|e| PluginError::fatal_from("flush failed", e))?;
        }
        Ok(())
    }
}

/// How long `drop` waits per batch when asked to act slow.
pub(crate) fn as_std(d: Option<ConfigDuration>) -> Option<Duration> {
    d.map(|d| d.0).filter(|d| !d.is_zero())
}
