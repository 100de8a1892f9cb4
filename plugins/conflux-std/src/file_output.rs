//! `file` output: JSON lines appended to one file, or to a file per
//! rendered path (`archive/{{ meta.hour }}.ndjson`: a data lake's hourly
//! partitions). A rendered path may not climb out of where its template
//! points (`..`), and at most `max_open` files stay open, the least
//! recently written closed first.

use std::path::PathBuf;

use conflux_api::template::Template;
use conflux_api::{
    async_trait, inventory, Batch, BuildContext, BuildError, FailedEvent, Output, OutputConfig, PluginError,
    Registration,
};
use schemars::JsonSchema;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use crate::codec::write_json_line;

/// Appends events to a file as JSON lines, one payload per line.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileOutputConfig {
    /// File to write, relative to the pipeline file; created with its folders if missing.
    /// A template (`lake/{{ meta.hour }}.ndjson`) writes each event to the file its fields name.
    pub path: String,
    /// Append to an existing file (default) or truncate it at start (a fixed path only).
    #[serde(default = "yes")]
    pub append: bool,
    /// fsync after every batch: slower, but an acknowledged event survives a power cut.
    #[serde(default)]
    pub sync: bool,
    /// With a templated path, the most files kept open; the least recently written is closed first.
    #[serde(default = "default_max_open")]
    pub max_open: usize,
}

fn yes() -> bool {
    true
}

fn default_max_open() -> usize {
    16
}

impl OutputConfig for FileOutputConfig {
    const TYPE: &'static str = "file";
    fn build(self, cx: &BuildContext) -> Result<Box<dyn Output>, BuildError> {
        let target = if self.path.contains("{{") {
            let template = Template::parse(&self.path).map_err(|e| BuildError::at(["path"], e.to_string()))?;
            if !self.append {
                return Err(BuildError::at(["append"], "a templated path appends: its files outlive a run"));
            }
            if self.max_open == 0 {
                return Err(BuildError::at(["max_open"], "keep at least one file open"));
            }
            Target::PerEvent { template, base: cx.base_dir.clone() }
        } else {
            Target::Fixed(cx.resolve(&self.path))
        };
        Ok(Box::new(FileOutput { target, config: self, files: tokio::sync::Mutex::new(OpenFiles::default()) }))
    }
}

inventory::submit!(Registration::output::<FileOutputConfig>());

enum Target {
    Fixed(PathBuf),
    PerEvent { template: Template, base: PathBuf },
}

/// Open files, most recently written last.
#[derive(Default)]
struct OpenFiles {
    open: Vec<(PathBuf, tokio::fs::File)>,
}

impl OpenFiles {
    /// The open file at `path`, opened (with its folders) if needed; the
    /// least recently written is closed when more than `max` would be open.
    async fn get(&mut self, path: &PathBuf, append: bool, max: usize) -> Result<&mut tokio::fs::File, PluginError> {
        if let Some(at) = self.open.iter().position(|(p, _)| p == path) {
            let entry = self.open.remove(at);
            self.open.push(entry);
        } else {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|e| PluginError::retryable_from(format!("cannot create {}", parent.display()), e))?;
            }
            let mut options = tokio::fs::OpenOptions::new();
            options.create(true).write(true);
            if append {
                options.append(true);
            } else {
                options.truncate(true);
            }
            let file = options
                .open(path)
                .await
                .map_err(|e| PluginError::retryable_from(format!("cannot open {}", path.display()), e))?;
            while self.open.len() >= max {
                // Every write flushes, so closing loses nothing.
                self.open.remove(0);
            }
            self.open.push((path.clone(), file));
        }
        Ok(&mut self.open.last_mut().expect("pushed above").1)
    }
}

struct FileOutput {
    target: Target,
    config: FileOutputConfig,
    /// Held across a write: lines of concurrent writes never interleave.
    files: tokio::sync::Mutex<OpenFiles>,
}

impl FileOutput {
    /// Where each event goes: lines grouped per file in batch order, and the events that cannot go anywhere.
    fn route(&self, batch: &Batch) -> (Vec<(PathBuf, Vec<u8>)>, Vec<FailedEvent>) {
        let (template, base) = match &self.target {
            Target::Fixed(path) => {
                // One file: every line into one buffer, nothing to look up per event.
                let mut lines = Vec::new();
                for event in batch {
                    write_json_line(&mut lines, &event.data);
                }
                return (vec![(path.clone(), lines)], Vec::new());
            }
            Target::PerEvent { template, base } => (template, base),
        };
        let mut groups: Vec<(PathBuf, Vec<u8>)> = Vec::new();
        let mut refused = Vec::new();
        for (index, event) in batch.iter().enumerate() {
            let path = match template.render(event) {
                Ok(rendered) => match checked(&rendered) {
                    Ok(()) => base.join(rendered),
                    Err(reason) => {
                        refused.push(FailedEvent::new(index, reason));
                        continue;
                    }
                },
                Err(e) => {
                    refused.push(FailedEvent::new(index, format!("path: {e}")));
                    continue;
                }
            };
            let at = match groups.iter().position(|(p, _)| *p == path) {
                Some(at) => at,
                None => {
                    groups.push((path, Vec::new()));
                    groups.len() - 1
                }
            };
            write_json_line(&mut groups[at].1, &event.data);
        }
        (groups, refused)
    }
}

/// A rendered path may name folders below its template's, never above.
fn checked(rendered: &str) -> Result<(), String> {
    if rendered.is_empty() || rendered.ends_with('/') {
        return Err(format!("path `{rendered}` names no file"));
    }
    if rendered.contains('\0') || rendered.split(['/', '\\']).any(|part| part == "..") {
        return Err("path: a field's value may not contain `..` or NUL".into());
    }
    Ok(())
}

#[async_trait]
impl Output for FileOutput {
    async fn connect(&mut self) -> Result<(), PluginError> {
        // Whatever was open may be what failed: open afresh.
        let files = self.files.get_mut();
        files.open.clear();
        if let Target::Fixed(path) = &self.target {
            // Open (and with `append: false` truncate) here, not per write.
            files.get(path, self.config.append, 1).await?;
        }
        Ok(())
    }

    async fn write(&self, batch: &Batch) -> Result<(), PluginError> {
        let (groups, refused) = self.route(batch);
        let mut files = self.files.lock().await;
        for (path, lines) in groups {
            // A fixed file is opened by connect: reopening it here could truncate it again.
            if matches!(self.target, Target::Fixed(_)) && files.open.is_empty() {
                return Err(PluginError::not_connected("file not open"));
            }
            let file = files.get(&path, true, self.config.max_open).await?;
            let written = async {
                file.write_all(&lines).await?;
                file.flush().await?;
                if self.config.sync {
                    file.sync_data().await?;
                }
                Ok::<(), std::io::Error>(())
            };
            if let Err(e) = written.await {
                files.open.retain(|(p, _)| *p != path);
                return Err(PluginError::NotConnected {
                    message: format!("cannot write {}", path.display()),
                    source: Some(Box::new(e)),
                });
            }
        }
        if refused.is_empty() {
            Ok(())
        } else {
            Err(PluginError::Partial(refused))
        }
    }

    async fn close(&mut self) -> Result<(), PluginError> {
        for (_, file) in &mut self.files.get_mut().open {
            file.flush().await.map_err(|e| PluginError::fatal_from("flush failed", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_paths_stay_below_their_template() {
        assert!(checked("2026/11/22/10.ndjson").is_ok());
        assert!(checked("../../etc/passwd").is_err());
        assert!(checked("a/../b").is_err());
        assert!(checked("a\\..\\b").is_err());
        assert!(checked("a\0b").is_err());
        assert!(checked("").is_err());
        assert!(checked("dir/").is_err());
    }
}
