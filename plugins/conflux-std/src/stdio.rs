//! `stdin` input and `stdout` output.

use conflux_api::{
    async_trait, inventory, Batch, BuildContext, BuildError, BuiltInput, Emitter, Input, InputConfig, Output,
    OutputConfig, PluginError, Registration,
};
use schemars::JsonSchema;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use crate::codec::{write_json_line, Codec, LineReader};

/// Reads events from standard input, one per line (NDJSON by default); ends at end of input.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StdinConfig {
    /// How lines become events (default `json`).
    #[serde(default)]
    pub codec: Codec,
    /// Most events per batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

fn default_batch_size() -> usize {
    1024
}

impl InputConfig for StdinConfig {
    const TYPE: &'static str = "stdin";
    fn build(self, _cx: &BuildContext) -> Result<BuiltInput, BuildError> {
        Ok(BuiltInput::new(StdinInput { reader: LineReader::new(tokio::io::stdin(), self.codec, self.batch_size) })
            .with_ports(&["invalid"]))
    }
}

inventory::submit!(Registration::input::<StdinConfig>());

struct StdinInput {
    reader: LineReader<tokio::io::Stdin>,
}

#[async_trait]
impl Input for StdinInput {
    async fn read(&mut self, out: &mut Emitter) -> Result<bool, PluginError> {
        self.reader.read_batch(out, "stdin").await.map_err(|e| PluginError::fatal_from("cannot read stdin", e))?;
        Ok(!self.reader.finished())
    }
}

/// Writes each event's payload to standard output as one JSON line.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StdoutConfig {}

impl OutputConfig for StdoutConfig {
    const TYPE: &'static str = "stdout";
    fn build(self, _cx: &BuildContext) -> Result<Box<dyn Output>, BuildError> {
        Ok(Box::new(StdoutOutput { out: tokio::sync::Mutex::new(tokio::io::stdout()) }))
    }
}

inventory::submit!(Registration::output::<StdoutConfig>());

struct StdoutOutput {
    /// Held across a write so that concurrent writes never interleave lines.
    out: tokio::sync::Mutex<tokio::io::Stdout>,
}

#[async_trait]
impl Output for StdoutOutput {
    async fn write(&self, batch: &Batch) -> Result<(), PluginError> {
        let mut buf = Vec::new();
        for event in batch {
            write_json_line(&mut buf, &event.data);
        }
        let mut out = self.out.lock().await;
        // A closed stdout (`| head`) will not come back: fail for good.
        out.write_all(&buf).await.map_err(|e| PluginError::fatal_from("cannot write stdout", e))?;
        out.flush().await.map_err(|e| PluginError::fatal_from("cannot flush stdout", e))
    }
}
