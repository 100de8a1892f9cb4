//! Reading the files a pipeline names (the pipeline itself, schemas, scripts,
//! keys, WebAssembly modules) with a size limit, and only when they are
//! regular files.
//!
//! A path may name `/dev/zero` (read until memory runs out) or a FIFO
//! (`open` waits forever for a writer), so every such read goes through
//! [`read_config_file`]: it checks the path is a regular file before opening
//! it, opens without blocking, checks the opened file again, and reads at
//! most `limit + 1` bytes.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Limit for pipeline files, schemas, scripts and keys.
pub const CONFIG_FILE_LIMIT: u64 = 16 << 20;

/// Limit for WebAssembly modules (compiled guests are larger than text).
pub const MODULE_FILE_LIMIT: u64 = 256 << 20;

/// Why a file could not be read; its display names the path.
#[derive(Debug)]
pub struct ReadError {
    pub path: PathBuf,
    pub reason: ReadErrorKind,
}

#[derive(Debug)]
pub enum ReadErrorKind {
    NotFound,
    /// A directory, FIFO, socket or device; the text says which.
    NotRegular(&'static str),
    TooLarge(u64),
    NotUtf8,
    Io(std::io::Error),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match &self.reason {
            ReadErrorKind::NotFound => write!(f, "{path} does not exist"),
            ReadErrorKind::NotRegular(what) => write!(f, "{path} is not a regular file (it is {what})"),
            ReadErrorKind::TooLarge(limit) => write!(f, "{path} is larger than the limit of {}", size_text(*limit)),
            ReadErrorKind::NotUtf8 => write!(f, "{path} is not UTF-8 text"),
            ReadErrorKind::Io(e) => write!(f, "cannot read {path}: {e}"),
        }
    }
}

impl std::error::Error for ReadError {}

fn size_text(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

fn file_type(meta: &std::fs::Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_file() {
        return None;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return Some("a FIFO");
        }
        if t.is_char_device() || t.is_block_device() {
            return Some("a device");
        }
        if t.is_socket() {
            return Some("a socket");
        }
    }
    Some(if t.is_dir() { "a directory" } else { "not a file" })
}

/// Reads a whole regular file of at most `limit` bytes.
pub fn read_config_file(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    let fail = |reason| ReadError { path: path.to_path_buf(), reason };
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound => fail(ReadErrorKind::NotFound),
        _ => fail(ReadErrorKind::Io(e)),
    };
    // Checked before opening: opening a FIFO blocks until a writer comes.
    let meta = std::fs::metadata(path).map_err(io)?;
    if let Some(what) = file_type(&meta) {
        return Err(fail(ReadErrorKind::NotRegular(what)));
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        // Should the path turn into a FIFO after the check, opening still returns at once.
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if let Some(what) = file_type(&meta) {
        return Err(fail(ReadErrorKind::NotRegular(what)));
    }
    if meta.len() > limit {
        return Err(fail(ReadErrorKind::TooLarge(limit)));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // One byte past the limit tells a file that grew after the check.
    file.take(limit + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(fail(ReadErrorKind::TooLarge(limit)));
    }
    Ok(bytes)
}

/// [`read_config_file`] for text files.
pub fn read_config_text(path: &Path, limit: u64) -> Result<String, ReadError> {
    let bytes = read_config_file(path, limit)?;
    String::from_utf8(bytes).map_err(|_| ReadError { path: path.to_path_buf(), reason: ReadErrorKind::NotUtf8 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_devices_directories_missing_and_large_files() {
        let err = read_config_file(Path::new("/dev/zero"), 10).unwrap_err().to_string();
        assert_eq!(err, "/dev/zero is not a regular file (it is a device)");
        let dir = tempfile_dir();
        let err = read_config_file(&dir, 10).unwrap_err().to_string();
        assert!(err.ends_with("is not a regular file (it is a directory)"), "{err}");
        let missing = dir.join("missing.yaml");
        assert_eq!(
            read_config_file(&missing, 10).unwrap_err().to_string(),
            format!("{} does not exist", missing.display())
        );
        let file = dir.join("f.txt");
        std::fs::write(&file, "0123456789").unwrap();
        assert_eq!(read_config_text(&file, 10).unwrap(), "0123456789");
        let err = read_config_file(&file, 9).unwrap_err().to_string();
        assert!(err.ends_with("is larger than the limit of 9 bytes"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("conflux-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
