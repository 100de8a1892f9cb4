//! `idempotent: true`: each event's commands run inside a Lua script that
//! keeps, in one hash, the last applied source position per stream. An
//! event at or below it was applied before (a replay after a crash) and is
//! skipped; the script runs atomically, so the increments and the position
//! that fences them land together or not at all.

use redis::{Arg, Cmd, Value};

/// Loaded once per connection (`SCRIPT LOAD`) and run by its digest.
/// Arguments: the stream, then per event its position (20 digits, so Lua
/// compares them as strings without losing precision past 2^53), its
/// command count, and per command its argument count and arguments.
/// Replies, per event: 1 applied, 0 skipped, or the error text of the
/// first command Redis refused (the event's later commands still ran, as
/// in a pipeline).
pub const SCRIPT: &str = r#"
local applied = redis.call('HGET', KEYS[1], ARGV[1]) or ''
local top = applied
local replies = {}
local i = 2
while i <= #ARGV do
  local position = ARGV[i]
  local commands = tonumber(ARGV[i + 1])
  i = i + 2
  local skip = position <= applied
  local reply = 1
  if skip then reply = 0 end
  for _ = 1, commands do
    local count = tonumber(ARGV[i])
    if not skip then
      local r = redis.pcall(unpack(ARGV, i + 1, i + count))
      if type(r) == 'table' and r.err and reply == 1 then reply = r.err end
    end
    i = i + 1 + count
  end
  if position > top then top = position end
  replies[#replies + 1] = reply
end
if top ~= applied then redis.call('HSET', KEYS[1], ARGV[1], top) end
return replies
"#;

/// One stream's events of a write batch, as one `EVALSHA`.
pub struct Fenced {
    cmd: Cmd,
    /// The batch index of each event, in the script's order.
    pub events: Vec<usize>,
}

impl Fenced {
    pub fn new(digest: &str, fence_key: &str, stream: &str) -> Fenced {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(digest).arg(1).arg(fence_key).arg(stream);
        Fenced { cmd, events: Vec::new() }
    }

    /// Adds an event at `offset` with its rendered commands.
    pub fn push(&mut self, index: usize, offset: u64, commands: &[Cmd]) {
        self.cmd.arg(format!("{offset:020}")).arg(commands.len());
        for command in commands {
            self.cmd.arg(command.args_iter().len());
            for arg in command.args_iter() {
                if let Arg::Simple(bytes) = arg {
                    self.cmd.arg(bytes);
                }
            }
        }
        self.events.push(index);
    }

    pub fn into_cmd(self) -> (Cmd, Vec<usize>) {
        (self.cmd, self.events)
    }
}

/// What the script did with one event.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Applied,
    /// At or below the stream's last applied position: applied before.
    Skipped,
    /// Redis refused one of its commands: its message.
    Refused(String),
}

/// Each event's outcome from the script's reply.
pub fn outcomes(reply: Value, events: usize) -> Result<Vec<Outcome>, String> {
    let Value::Array(items) = reply else { return Err(format!("unexpected reply from the fence script: {reply:?}")) };
    if items.len() != events {
        return Err(format!("the fence script answered for {} events of {events}", items.len()));
    }
    Ok(items
        .into_iter()
        .map(|item| match item {
            Value::Int(0) => Outcome::Skipped,
            Value::Int(_) => Outcome::Applied,
            Value::BulkString(text) => Outcome::Refused(String::from_utf8_lossy(&text).into_owned()),
            Value::SimpleString(text) => Outcome::Refused(text),
            other => Outcome::Refused(format!("{other:?}")),
        })
        .collect())
}
