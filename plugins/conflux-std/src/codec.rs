//! Line framing shared by the `file` and `stdin` inputs and the line-writing outputs.

use conflux_api::component::ERROR_META;
use conflux_api::{Emitter, Event, Payload, PortId, Timestamp, Value};
use schemars::JsonSchema;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};

use conflux_api::Bytes;

/// How lines become events.
#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Codec {
    /// One JSON document per line (NDJSON); lines that are not JSON go to the `invalid` port.
    #[default]
    Json,
    /// Each line is a string payload.
    Lines,
}

/// The port malformed lines go to.
pub const INVALID_PORT: PortId = PortId(1);

/// Splits a byte stream into lines and turns them into events, a batch at a time.
///
/// Reading happens only before any event is emitted in a call, so a call
/// cancelled at shutdown loses nothing it had already handed over.
pub struct LineReader<R> {
    reader: R,
    buf: Vec<u8>,
    start: usize,
    eof: bool,
    line_no: u64,
    codec: Codec,
    batch_size: usize,
    /// The current batch's lines: (offset from the batch's first byte, length).
    lines: Vec<(usize, usize)>,
    /// Set for replayable sources (a file): events carry their line number as position.
    stream: Option<std::sync::Arc<str>>,
    /// A followed file: an unterminated last line is half written, so it
    /// waits for its newline instead of being emitted at the end of the data.
    hold_partial: bool,
    /// Bytes read from the current reader: a followed file shorter than
    /// this was truncated.
    read: u64,
}

const CHUNK: usize = 256 * 1024;
/// Size of the copies events' texts are sliced from. Small enough for the
/// allocator to recycle like any small block (one copy per whole batch,
/// ~300 KiB, raised peak RSS by 11–43 MiB), big enough that a copy serves
/// a hundred booking events.
const REGION: usize = 32 * 1024;
/// Longest line accepted; a longer one is cut off and sent to `invalid`.
pub const MAX_LINE: usize = 16 * 1024 * 1024;

impl<R: AsyncRead + Unpin + Send> LineReader<R> {
    pub fn new(reader: R, codec: Codec, batch_size: usize) -> Self {
        LineReader {
            reader,
            buf: Vec::with_capacity(CHUNK),
            start: 0,
            eof: false,
            line_no: 0,
            codec,
            batch_size: batch_size.max(1),
            lines: Vec::new(),
            stream: None,
            hold_partial: false,
            read: 0,
        }
    }

    /// Holds an unterminated last line until its newline arrives (`follow`).
    pub fn holding_partial_lines(mut self) -> Self {
        self.hold_partial = true;
        self
    }

    /// Bytes read from the current reader so far.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }

    /// Goes on from another reader (a rotated or truncated file opened
    /// again). Line numbers go on counting, so positions stay increasing;
    /// a held partial line of the old reader will never be finished there,
    /// so it is emitted as a line of its own.
    pub fn reopen(&mut self, reader: R) {
        if self.start < self.buf.len() {
            self.buf.push(b'\n');
        }
        self.reader = reader;
        self.read = 0;
        self.eof = false;
    }

    /// Stamps every event with its line number in `stream`, so checkpointing
    /// stages recognise lines they already counted when the file is read again.
    pub fn with_positions(mut self, stream: impl Into<std::sync::Arc<str>>) -> Self {
        self.stream = Some(stream.into());
        self
    }

    /// Whether the stream has ended and every line was emitted (every
    /// complete line, when holding partial lines).
    pub fn finished(&self) -> bool {
        self.eof && (self.start >= self.buf.len() || (self.hold_partial && !self.has_line()))
    }

    fn has_line(&self) -> bool {
        memchr::memchr(b'\n', &self.buf[self.start..]).is_some()
    }

    /// Clears the end-of-stream flag so a followed file is read again.
    pub fn resume(&mut self) {
        self.eof = false;
    }

    /// Reads until at least one full line is buffered (or the stream ends).
    async fn fill(&mut self) -> std::io::Result<()> {
        while !self.eof && memchr::memchr(b'\n', &self.buf[self.start..]).is_none() {
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            if self.buf.len() >= MAX_LINE {
                // Force a break so one giant line cannot grow memory without bound.
                self.buf.push(b'\n');
                break;
            }
            // Reads into spare capacity: nothing is zeroed first.
            self.buf.reserve(CHUNK);
            let n = self.reader.read_buf(&mut self.buf).await?;
            self.read += n as u64;
            if n == 0 {
                self.eof = true;
            }
        }
        Ok(())
    }

    /// Emits up to one batch of events. Returns how many lines were consumed.
    ///
    /// Lines are copied out of the read buffer [`REGION`] bytes at a time and
    /// each event's text is a slice of such a copy: one allocation per few
    /// dozen lines, not one per line.
    pub async fn read_batch(&mut self, out: &mut Emitter, source: &str) -> std::io::Result<usize> {
        self.fill().await?;
        let now = Timestamp::now();
        let first = self.start;
        self.lines.clear();
        while self.lines.len() < self.batch_size && self.start < self.buf.len() {
            let rest = &self.buf[self.start..];
            let (len, advance) = match memchr::memchr(b'\n', rest) {
                Some(i) => (i, i + 1),
                None if self.eof && !self.hold_partial => (rest.len(), rest.len()),
                None => break,
            };
            self.lines.push((self.start - first, len));
            self.start += advance;
        }
        let consumed = self.lines.len();
        let total = self.start - first;
        // The copy the current lines are sliced from, and its offset in the batch.
        let (mut region, mut region_at) = (Bytes::new(), 0);
        let mut batch = Vec::with_capacity(consumed);
        for &(at, len) in &self.lines {
            self.line_no += 1;
            if region.is_empty() || at + len > region_at + region.len() {
                let end = (at + REGION).min(total).max(at + len);
                region = Bytes::copy_from_slice(&self.buf[first + at..first + end]);
                region_at = at;
            }
            let line = &region[at - region_at..at - region_at + len];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match self.codec {
                // The line is checked, not parsed: stages read its fields from
                // the text, and the JSON outputs copy it.
                Codec::Json => match Payload::from_json_bytes(region.slice_ref(line)) {
                    Ok(data) => batch.push(self.positioned(Event::with_time(data, now))),
                    Err(reason) => {
                        let mut e = Event::with_time(Value::from(String::from_utf8_lossy(line).as_ref()), now);
                        e.meta.insert(
                            ERROR_META,
                            format!("{source} line {}: invalid JSON: {reason}", self.line_no).as_str(),
                        );
                        out.emit_to(INVALID_PORT, e);
                    }
                },
                Codec::Lines => batch
                    .push(self.positioned(Event::with_time(Value::from(String::from_utf8_lossy(line).as_ref()), now))),
            }
        }
        out.emit_batch(batch);
        Ok(consumed)
    }

    fn positioned(&self, event: Event) -> Event {
        match &self.stream {
            Some(stream) => event.at(stream, self.line_no),
            None => event,
        }
    }
}

/// Appends an event payload as one JSON line.
pub fn write_json_line(buf: &mut Vec<u8>, data: &Payload) {
    data.write_json(buf);
    buf.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn splits_batches_and_routes_bad_lines() {
        let text = b"{\"a\":1}\n\n{bad\n{\"a\":2}\r\n{\"a\":3}".to_vec();
        let mut reader = LineReader::new(&text[..], Codec::Json, 2);
        let mut out = Emitter::new(1);
        reader.read_batch(&mut out, "t").await.unwrap();
        let got: Vec<(usize, usize)> = out.drain().map(|(p, b)| (p, b.len())).collect();
        assert_eq!(got, vec![(0, 1)], "first batch: one good line and a blank one");
        reader.read_batch(&mut out, "t").await.unwrap();
        let got: Vec<(usize, Vec<Event>)> = out.drain().collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].0, 1, "bad line goes to the invalid port");
        let reason = got[1].1[0].meta.get(ERROR_META).unwrap().to_string();
        assert!(reason.contains("line 3: invalid JSON"), "{reason}");
        reader.read_batch(&mut out, "t").await.unwrap();
        let last: Vec<(usize, Vec<Event>)> = out.drain().collect();
        assert_eq!(last[0].1.len(), 1, "unterminated last line still counts");
        assert!(reader.finished());
    }

    #[tokio::test]
    async fn every_line_of_a_batch_spanning_several_copies_is_kept_whole() {
        // Lines of growing length, one longer than a whole copy, and blank lines between some.
        let lines: Vec<String> = (0..400)
            .map(|i| match i {
                200 => format!("{{\"big\":\"{}\"}}", "x".repeat(REGION * 2)),
                _ => format!("{{\"n\":{i},\"pad\":\"{}\"}}", "p".repeat(i * 3)),
            })
            .collect();
        let mut text = String::new();
        for (i, line) in lines.iter().enumerate() {
            text.push_str(line);
            text.push_str(if i % 7 == 0 { "\n\n" } else { "\r\n" });
        }
        let mut reader = LineReader::new(text.as_bytes(), Codec::Json, 10_000);
        let mut out = Emitter::new(1);
        let mut events = Vec::new();
        while !reader.finished() {
            reader.read_batch(&mut out, "t").await.unwrap();
            for (port, batch) in out.drain() {
                assert_eq!(port, 0, "nothing invalid");
                events.extend(batch);
            }
        }
        let texts: Vec<&[u8]> = events.iter().map(|e| e.data.raw_json().unwrap()).collect();
        let expected: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
        assert_eq!(texts, expected);
    }
}
