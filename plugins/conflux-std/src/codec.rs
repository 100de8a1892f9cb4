//! Line framing shared by the `file` and `stdin` inputs and the line-writing outputs.

use conflux_api::component::ERROR_META;
use conflux_api::{Emitter, Event, Payload, PortId, Timestamp, Value};
use schemars::JsonSchema;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};

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
    /// Set for replayable sources (a file): events carry their line number as position.
    stream: Option<std::sync::Arc<str>>,
}

const CHUNK: usize = 256 * 1024;
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
            stream: None,
        }
    }

    /// Stamps every event with its line number in `stream`, so checkpointing
    /// stages recognise lines they already counted when the file is read again.
    pub fn with_positions(mut self, stream: impl Into<std::sync::Arc<str>>) -> Self {
        self.stream = Some(stream.into());
        self
    }

    /// Whether the stream has ended and every line was emitted.
    pub fn finished(&self) -> bool {
        self.eof && self.start >= self.buf.len()
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
            let len = self.buf.len();
            self.buf.resize(len + CHUNK, 0);
            let n = self.reader.read(&mut self.buf[len..]).await?;
            self.buf.truncate(len + n);
            if n == 0 {
                self.eof = true;
            }
        }
        Ok(())
    }

    /// Emits up to one batch of events. Returns how many lines were consumed.
    pub async fn read_batch(&mut self, out: &mut Emitter, source: &str) -> std::io::Result<usize> {
        self.fill().await?;
        let now = Timestamp::now();
        let mut consumed = 0;
        // (line number, line) of every non-blank line in this batch.
        let mut lines: Vec<(u64, &[u8])> = Vec::with_capacity(self.batch_size.min(4096));
        let mut start = self.start;
        while consumed < self.batch_size && start < self.buf.len() {
            let rest = &self.buf[start..];
            let (line, advance) = match memchr::memchr(b'\n', rest) {
                Some(i) => (&rest[..i], i + 1),
                None if self.eof => (rest, rest.len()),
                None => break,
            };
            start += advance;
            self.line_no += 1;
            consumed += 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if !line.iter().all(u8::is_ascii_whitespace) {
                lines.push((self.line_no, line));
            }
        }
        let mut batch = Vec::with_capacity(lines.len());
        match self.codec {
            Codec::Json => {
                for ((line_no, line), parsed) in lines.iter().zip(parse_lines(&lines)) {
                    match parsed {
                        Ok(data) => batch.push(positioned(&self.stream, *line_no, Event::with_time(data, now))),
                        Err(reason) => {
                            let mut e = Event::with_time(Value::from(String::from_utf8_lossy(line).as_ref()), now);
                            e.meta.insert(
                                ERROR_META,
                                format!("{source} line {line_no}: invalid JSON: {reason}").as_str(),
                            );
                            out.emit_to(INVALID_PORT, e);
                        }
                    }
                }
            }
            Codec::Lines => {
                for (line_no, line) in &lines {
                    let data = Value::from(String::from_utf8_lossy(line).as_ref());
                    batch.push(positioned(&self.stream, *line_no, Event::with_time(data, now)));
                }
            }
        }
        self.start = start;
        out.emit_batch(batch);
        Ok(consumed)
    }
}

/// Stamps an event with its line number in a replayable `stream`.
fn positioned(stream: &Option<std::sync::Arc<str>>, line_no: u64, event: Event) -> Event {
    match stream {
        Some(stream) => event.at(stream, line_no),
        None => event,
    }
}

/// Fewest lines worth a second thread: below this, starting one costs more
/// than it saves.
const PARALLEL_LINES: usize = 512;

/// Parses JSON lines in order. A large batch is split in two and the halves
/// are parsed on two threads: parsing is most of what a file pipeline costs,
/// and one reader task would otherwise leave the second core to the stages.
fn parse_lines(lines: &[(u64, &[u8])]) -> Vec<Result<Payload, String>> {
    let parse = |lines: &[(u64, &[u8])]| -> Vec<Result<Payload, String>> {
        lines
            .iter()
            .map(|(_, line)| {
                // The line is kept beside the value: stages that pass payloads
                // on as JSON (wasm) and the JSON outputs copy it instead of
                // serializing the value again.
                conflux_api::sonic_rs::from_slice(line)
                    .map(|data| Payload::parsed(data, line.trim_ascii()))
                    .map_err(|e| e.to_string())
            })
            .collect()
    };
    if lines.len() < PARALLEL_LINES || std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return parse(lines);
    }
    let (first, second) = lines.split_at(lines.len() / 2);
    std::thread::scope(|scope| {
        let other = scope.spawn(|| parse(second));
        let mut parsed = parse(first);
        match other.join() {
            Ok(rest) => parsed.extend(rest),
            // A panic while parsing is not expected; parse the half again here.
            Err(_) => parsed.extend(parse(second)),
        }
        parsed
    })
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
    async fn large_batches_keep_order_and_line_numbers() {
        use conflux_api::sonic_rs::JsonValueTrait;
        // Enough lines for the two-thread parse, with blank and bad lines in both halves.
        let mut text = Vec::new();
        for n in 1..=2000 {
            match n {
                7 | 1500 => text.extend_from_slice(b"{broken\n"),
                8 | 1501 => text.extend_from_slice(b"   \n"),
                _ => text.extend_from_slice(format!("{{\"n\":{n}}}\n").as_bytes()),
            }
        }
        let mut reader = LineReader::new(&text[..], Codec::Json, 4096).with_positions("file:t");
        let mut out = Emitter::new(2);
        assert_eq!(reader.read_batch(&mut out, "t").await.unwrap(), 2000);
        let mut ports: Vec<(usize, Vec<Event>)> = out.drain().collect();
        ports.sort_by_key(|(port, _)| *port);
        let good = &ports[0].1;
        assert_eq!(good.len(), 1996);
        for e in good {
            let n = e.data.get("n").and_then(|n| n.as_u64()).unwrap();
            assert_eq!(e.position.as_ref().map(|p| p.offset), Some(n), "position is the line number");
            assert_eq!(e.data.raw_json(), Some(format!("{{\"n\":{n}}}").as_bytes()), "text kept");
        }
        assert!(good
            .windows(2)
            .all(|w| w[0].position.as_ref().unwrap().offset < w[1].position.as_ref().unwrap().offset));
        let bad: Vec<String> = ports[1].1.iter().map(|e| e.meta.get(ERROR_META).unwrap().to_string()).collect();
        assert_eq!(bad.len(), 2);
        assert!(bad[0].contains("line 7:") && bad[1].contains("line 1500:"), "{bad:?}");
    }
}
