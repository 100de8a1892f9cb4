//! `drop` output: acknowledges and discards. Optionally slow, to rehearse backpressure.

use conflux_api::config::Duration;
use conflux_api::{
    async_trait, inventory, Batch, BuildContext, BuildError, Output, OutputConfig, PluginError, Registration,
};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::file::as_std;

/// Discards events and acknowledges them (benchmarks, dry runs).
///
/// `delay` makes every batch take that long, to rehearse a slow destination
/// and watch backpressure reach the inputs.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DropConfig {
    /// Time each batch takes, simulating a slow destination; unset takes none.
    #[serde(default)]
    pub delay: Option<Duration>,
}

impl OutputConfig for DropConfig {
    const TYPE: &'static str = "drop";
    fn build(self, _cx: &BuildContext) -> Result<Box<dyn Output>, BuildError> {
        Ok(Box::new(DropOutput { delay: as_std(self.delay) }))
    }
}

inventory::submit!(Registration::output::<DropConfig>());

struct DropOutput {
    delay: Option<std::time::Duration>,
}

#[async_trait]
impl Output for DropOutput {
    async fn write(&self, _batch: &Batch) -> Result<(), PluginError> {
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        Ok(())
    }
}
