//! The commands the `redis` output runs for each event: their options, and
//! how one event becomes the Redis commands of a pipeline.
//!
//! Every argument is a template over the event (`metrics:hourly:{{ hour }}`),
//! parsed once at build time. An event whose template cannot be rendered
//! (a field missing, an amount that is not a number) sends nothing at all:
//! it goes to the output's `error` port, never half-applied.

use std::collections::BTreeMap;

use conflux_api::config::Duration;
use conflux_api::registry::describe_str;
use conflux_api::sonic_rs::{JsonContainerTrait, JsonValueTrait};
use conflux_api::template::{ReadFields, Template};
use conflux_api::{BuildError, Event, FieldPath};
use schemars::JsonSchema;
use serde::Deserialize;

/// One Redis command, by name: `- hincrby: { key: "metrics:today", field: bookings }`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CommandConfig {
    /// `SET key value` (with `ttl`: `SET … PX`): the latest value wins.
    Set(SetConfig),
    /// `HSET key field value …`: the named `fields`, or every member of `object` (default: the payload).
    Hset(HsetConfig),
    /// `HINCRBY key field by`.
    Hincrby(HashIncrConfig),
    /// `HINCRBYFLOAT key field by`.
    Hincrbyfloat(HashIncrConfig),
    /// `INCRBY key by`.
    Incrby(IncrConfig),
    /// `ZADD key [GT|LT] [INCR] score member`.
    Zadd(ZaddConfig),
    /// `ZINCRBY key by member`: leaderboards.
    Zincrby(ZincrbyConfig),
    /// `PFADD key element`: approximate distinct counts (HyperLogLog).
    Pfadd(PfaddConfig),
    /// `XADD key [MAXLEN ~ n] * field value …` (default: one field `data`, the payload).
    Xadd(XaddConfig),
    /// `PUBLISH channel message` (default: the payload).
    Publish(PublishConfig),
    /// `LPUSH key value` (default: the payload), then `LTRIM` to the newest `keep`.
    Lpush(PushConfig),
    /// `RPUSH key value` (default: the payload), then `LTRIM` to the newest `keep`.
    Rpush(PushConfig),
    /// `DEL key`.
    Del(DelConfig),
}

/// A number given as such (`by: 1`) or read from the event (`by: "{{ guests }}"`).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Amount {
    Number(f64),
    Template(String),
}

fn one() -> Amount {
    Amount::Number(1.0)
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetConfig {
    /// Key template, such as `last:{{ restaurantId }}`.
    pub key: String,
    /// Value template; unset writes the payload as JSON.
    #[serde(default)]
    pub value: Option<String>,
    /// Expire the key this long after the write.
    #[serde(default)]
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HsetConfig {
    /// Key template, such as `metrics:today`.
    pub key: String,
    /// Hash field → value template. Unset writes every member of `object`.
    #[serde(default)]
    pub fields: Option<BTreeMap<String, String>>,
    /// Field path of an object whose members become the hash's fields (strings as they
    /// are, other values as JSON); default: the whole payload.
    #[serde(default)]
    pub object: Option<String>,
    /// Expire the key this long after the write (`PEXPIRE` in the same round trip).
    #[serde(default)]
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HashIncrConfig {
    /// Key template.
    pub key: String,
    /// Hash field template, such as `{{ zone }}`.
    pub field: String,
    /// Amount (default 1): a number or a template such as `{{ guests }}`.
    #[serde(default = "one")]
    pub by: Amount,
    /// Expire the key this long after the write.
    #[serde(default)]
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IncrConfig {
    /// Key template.
    pub key: String,
    /// Integer amount (default 1): a number or a template.
    #[serde(default = "one")]
    pub by: Amount,
    /// Expire the key this long after the write.
    #[serde(default)]
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ZaddConfig {
    /// Key template.
    pub key: String,
    /// Member template.
    pub member: String,
    /// Score: a number or a template.
    pub score: Amount,
    /// Add the score to the member's (`INCR`).
    #[serde(default)]
    pub incr: bool,
    /// Only raise a member's score (`GT`): a running maximum.
    #[serde(default)]
    pub gt: bool,
    /// Only lower a member's score (`LT`): a running minimum.
    #[serde(default)]
    pub lt: bool,
    /// Expire the key this long after the write.
    #[serde(default)]
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ZincrbyConfig {
    /// Key template.
    pub key: String,
    /// Member template.
    pub member: String,
    /// Amount (default 1): a number or a template.
    #[serde(default = "one")]
    pub by: Amount,
    /// Expire the key this long after the write.
    #[serde(default)]
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PfaddConfig {
    /// Key template.
    pub key: String,
    /// Element template, such as `{{ userId }}`.
    pub element: String,
    /// Expire the key this long after the write.
    #[serde(default)]
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct XaddConfig {
    /// Stream key template.
    pub key: String,
    /// Entry field → value template; unset writes one field, `data`, with the payload.
    #[serde(default)]
    pub fields: Option<BTreeMap<String, String>>,
    /// Keep about this many entries (`MAXLEN ~`).
    #[serde(default)]
    pub maxlen: Option<u64>,
    /// Expire the key this long after the write.
    #[serde(default)]
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishConfig {
    /// Channel template.
    pub channel: String,
    /// Message template; unset publishes the payload as JSON.
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PushConfig {
    /// List key template.
    pub key: String,
    /// Value template; unset pushes the payload as JSON.
    #[serde(default)]
    pub value: Option<String>,
    /// Keep only the newest this many items (`LTRIM` in the same round trip): recent-items lists.
    #[serde(default)]
    pub keep: Option<u32>,
    /// Expire the key this long after the write.
    #[serde(default)]
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DelConfig {
    /// Key template.
    pub key: String,
}

/// A value an argument takes: the payload's JSON text, or a template.
#[derive(Debug)]
enum Arg {
    Payload,
    Text(Template),
}

/// An amount, ready: a constant or a template parsed as a number per event.
#[derive(Debug)]
enum Number {
    Const(f64),
    Read(Template),
}

impl Arg {
    fn template(&self) -> Option<&Template> {
        match self {
            Arg::Text(t) => Some(t),
            Arg::Payload => None,
        }
    }
}

impl Number {
    fn template(&self) -> Option<&Template> {
        match self {
            Number::Read(t) => Some(t),
            Number::Const(_) => None,
        }
    }
}

/// Where `HSET` takes its fields from.
#[derive(Debug)]
enum HashFields {
    Named(Vec<(String, Template)>),
    Object(Option<FieldPath>),
}

#[derive(Debug)]
enum Op {
    Set(Arg),
    Hset(HashFields),
    Hincrby(Template, Number),
    Hincrbyfloat(Template, Number),
    Incrby(Number),
    Zadd { member: Template, score: Number, incr: bool, gt: bool, lt: bool },
    Zincrby(Template, Number),
    Pfadd(Template),
    Xadd { fields: Option<Vec<(String, Template)>>, maxlen: Option<u64> },
    Publish(Arg),
    Push { left: bool, value: Arg, keep: Option<u32> },
    Del,
}

/// One configured command, parsed.
#[derive(Debug)]
pub struct Command {
    /// The key (or, for `publish`, the channel).
    key: Template,
    op: Op,
    ttl_ms: Option<u64>,
}

fn template(text: &str, at: &[String]) -> Result<Template, BuildError> {
    Template::parse(text).map_err(|e| BuildError::at(at.iter().cloned(), e.to_string()))
}

fn arg(text: Option<&String>, at: &[String]) -> Result<Arg, BuildError> {
    text.map_or(Ok(Arg::Payload), |t| template(t, at).map(Arg::Text))
}

fn number(amount: &Amount, at: &[String], integer: bool) -> Result<Number, BuildError> {
    match amount {
        Amount::Number(n) if integer && n.fract() != 0.0 => {
            Err(BuildError::at(at.iter().cloned(), format!("{n} is not an integer")))
        }
        Amount::Number(n) => Ok(Number::Const(*n)),
        Amount::Template(t) => template(t, at).map(Number::Read),
    }
}

fn named(fields: &BTreeMap<String, String>, at: &[String]) -> Result<Vec<(String, Template)>, BuildError> {
    fields
        .iter()
        .map(|(name, t)| {
            let mut at = at.to_vec();
            at.push(name.clone());
            template(t, &at).map(|t| (name.clone(), t))
        })
        .collect()
}

fn ttl(ttl: Option<Duration>, at: &[String]) -> Result<Option<u64>, BuildError> {
    match ttl {
        Some(d) if d.0.as_millis() == 0 => {
            let mut at = at.to_vec();
            at.push("ttl".into());
            Err(BuildError::at(at, "ttl must be at least 1ms"))
        }
        Some(d) => Ok(Some(u64::try_from(d.0.as_millis()).unwrap_or(u64::MAX))),
        None => Ok(None),
    }
}

impl Command {
    /// Parses the `index`-th configured command.
    pub fn build(config: &CommandConfig, index: usize) -> Result<Command, BuildError> {
        let base = |name: &str| vec!["commands".to_string(), index.to_string(), name.to_string()];
        let at = |name: &str, option: &str| {
            let mut at = base(name);
            at.push(option.into());
            at
        };
        let (key, op, ttl_ms) = match config {
            CommandConfig::Set(c) => {
                (&c.key, Op::Set(arg(c.value.as_ref(), &at("set", "value"))?), ttl(c.ttl, &base("set"))?)
            }
            CommandConfig::Hset(c) => {
                let fields = match (&c.fields, &c.object) {
                    (Some(_), Some(_)) => {
                        return Err(BuildError::at(base("hset"), "give `fields` or `object`, not both"))
                    }
                    (Some(fields), None) => HashFields::Named(named(fields, &at("hset", "fields"))?),
                    (None, object) => HashFields::Object(
                        object
                            .as_deref()
                            .map(|p| FieldPath::parse(p).map_err(|e| BuildError::at(at("hset", "object"), e)))
                            .transpose()?,
                    ),
                };
                (&c.key, Op::Hset(fields), ttl(c.ttl, &base("hset"))?)
            }
            CommandConfig::Hincrby(c) => (
                &c.key,
                Op::Hincrby(template(&c.field, &at("hincrby", "field"))?, number(&c.by, &at("hincrby", "by"), true)?),
                ttl(c.ttl, &base("hincrby"))?,
            ),
            CommandConfig::Hincrbyfloat(c) => (
                &c.key,
                Op::Hincrbyfloat(
                    template(&c.field, &at("hincrbyfloat", "field"))?,
                    number(&c.by, &at("hincrbyfloat", "by"), false)?,
                ),
                ttl(c.ttl, &base("hincrbyfloat"))?,
            ),
            CommandConfig::Incrby(c) => {
                (&c.key, Op::Incrby(number(&c.by, &at("incrby", "by"), true)?), ttl(c.ttl, &base("incrby"))?)
            }
            CommandConfig::Zadd(c) => {
                if c.gt && c.lt {
                    return Err(BuildError::at(base("zadd"), "`gt` and `lt` exclude each other"));
                }
                let op = Op::Zadd {
                    member: template(&c.member, &at("zadd", "member"))?,
                    score: number(&c.score, &at("zadd", "score"), false)?,
                    incr: c.incr,
                    gt: c.gt,
                    lt: c.lt,
                };
                (&c.key, op, ttl(c.ttl, &base("zadd"))?)
            }
            CommandConfig::Zincrby(c) => (
                &c.key,
                Op::Zincrby(
                    template(&c.member, &at("zincrby", "member"))?,
                    number(&c.by, &at("zincrby", "by"), false)?,
                ),
                ttl(c.ttl, &base("zincrby"))?,
            ),
            CommandConfig::Pfadd(c) => {
                (&c.key, Op::Pfadd(template(&c.element, &at("pfadd", "element"))?), ttl(c.ttl, &base("pfadd"))?)
            }
            CommandConfig::Xadd(c) => {
                let fields = c.fields.as_ref().map(|f| named(f, &at("xadd", "fields"))).transpose()?;
                (&c.key, Op::Xadd { fields, maxlen: c.maxlen }, ttl(c.ttl, &base("xadd"))?)
            }
            CommandConfig::Publish(c) => {
                (&c.channel, Op::Publish(arg(c.message.as_ref(), &at("publish", "message"))?), None)
            }
            CommandConfig::Lpush(c) | CommandConfig::Rpush(c) => {
                let (name, left) =
                    if matches!(config, CommandConfig::Lpush(_)) { ("lpush", true) } else { ("rpush", false) };
                if c.keep == Some(0) {
                    return Err(BuildError::at(at(name, "keep"), "keep must be at least 1"));
                }
                let op = Op::Push { left, value: arg(c.value.as_ref(), &at(name, "value"))?, keep: c.keep };
                (&c.key, op, ttl(c.ttl, &base(name))?)
            }
            CommandConfig::Del(c) => (&c.key, Op::Del, None),
        };
        let key_name = if matches!(config, CommandConfig::Publish(_)) { "channel" } else { "key" };
        let command_name = base_name(config);
        Ok(Command { key: template(key, &at(command_name, key_name))?, op, ttl_ms })
    }

    /// Every template the command renders, so an output reads all their
    /// fields in one scan of each event.
    pub fn templates(&self) -> Vec<&Template> {
        let mut all = vec![&self.key];
        match &self.op {
            Op::Set(value) | Op::Publish(value) | Op::Push { value, .. } => all.extend(value.template()),
            Op::Hset(HashFields::Named(fields)) => all.extend(fields.iter().map(|(_, t)| t)),
            Op::Hset(HashFields::Object(_)) | Op::Del => {}
            Op::Hincrby(field, by) | Op::Hincrbyfloat(field, by) => {
                all.push(field);
                all.extend(by.template());
            }
            Op::Incrby(by) => all.extend(by.template()),
            Op::Zadd { member, score, .. } => {
                all.push(member);
                all.extend(score.template());
            }
            Op::Zincrby(member, by) => {
                all.push(member);
                all.extend(by.template());
            }
            Op::Pfadd(element) => all.push(element),
            Op::Xadd { fields, .. } => all.extend(fields.iter().flatten().map(|(_, t)| t)),
        }
        all
    }

    /// Appends this command's Redis commands for `event` to `out`; the
    /// reason when the event cannot be rendered (nothing is appended then).
    /// `read`: the event's fields, found in one scan for every command (see [`Command::templates`]).
    pub fn render(
        &self,
        event: &Event,
        read: &ReadFields,
        payload: &mut Option<Vec<u8>>,
        out: &mut Vec<redis::Cmd>,
    ) -> Result<(), String> {
        let key = self.key.render_with(event, read).map_err(|e| format!("key: {e}"))?;
        let mut text_of = |a: &Arg| -> Result<Vec<u8>, String> {
            match a {
                Arg::Payload => Ok(json(event, payload)),
                Arg::Text(t) => t.render_with(event, read).map(String::into_bytes).map_err(|e| e.to_string()),
            }
        };
        let mut cmd;
        match &self.op {
            Op::Set(value) => {
                cmd = redis::cmd("SET");
                cmd.arg(&key).arg(text_of(value)?);
                if let Some(ms) = self.ttl_ms {
                    cmd.arg("PX").arg(ms);
                }
                out.push(cmd);
                return Ok(());
            }
            Op::Hset(fields) => {
                cmd = redis::cmd("HSET");
                cmd.arg(&key);
                match fields {
                    HashFields::Named(fields) => {
                        for (name, t) in fields {
                            cmd.arg(name).arg(t.render_with(event, read).map_err(|e| format!("fields.{name}: {e}"))?);
                        }
                    }
                    HashFields::Object(path) => {
                        let found = match path {
                            Some(p) => p.lookup(&event.data).ok_or_else(|| format!("field `{p}` is missing"))?,
                            None => event.data.root(),
                        };
                        let value = found.to_value();
                        let members =
                            value.as_object().ok_or("hset takes the members of an object, and this is not one")?;
                        if members.is_empty() {
                            return Err("hset of an object without members".into());
                        }
                        for (name, v) in members.iter() {
                            cmd.arg(name);
                            match v.as_str() {
                                Some(s) => cmd.arg(s),
                                None => cmd.arg(conflux_api::sonic_rs::to_string(v).unwrap_or_default()),
                            };
                        }
                    }
                }
            }
            Op::Hincrby(field, by) => {
                cmd = redis::cmd("HINCRBY");
                cmd.arg(&key)
                    .arg(field.render_with(event, read).map_err(|e| format!("field: {e}"))?)
                    .arg(integer(by, event, read)?);
            }
            Op::Hincrbyfloat(field, by) => {
                cmd = redis::cmd("HINCRBYFLOAT");
                cmd.arg(&key)
                    .arg(field.render_with(event, read).map_err(|e| format!("field: {e}"))?)
                    .arg(float(by, event, read)?);
            }
            Op::Incrby(by) => {
                cmd = redis::cmd("INCRBY");
                cmd.arg(&key).arg(integer(by, event, read)?);
            }
            Op::Zadd { member, score, incr, gt, lt } => {
                cmd = redis::cmd("ZADD");
                cmd.arg(&key);
                if *gt {
                    cmd.arg("GT");
                }
                if *lt {
                    cmd.arg("LT");
                }
                if *incr {
                    cmd.arg("INCR");
                }
                cmd.arg(float(score, event, read)?)
                    .arg(member.render_with(event, read).map_err(|e| format!("member: {e}"))?);
            }
            Op::Zincrby(member, by) => {
                cmd = redis::cmd("ZINCRBY");
                cmd.arg(&key)
                    .arg(float(by, event, read)?)
                    .arg(member.render_with(event, read).map_err(|e| format!("member: {e}"))?);
            }
            Op::Pfadd(element) => {
                cmd = redis::cmd("PFADD");
                cmd.arg(&key).arg(element.render_with(event, read).map_err(|e| format!("element: {e}"))?);
            }
            Op::Xadd { fields, maxlen } => {
                cmd = redis::cmd("XADD");
                cmd.arg(&key);
                if let Some(n) = maxlen {
                    cmd.arg("MAXLEN").arg("~").arg(*n);
                }
                cmd.arg("*");
                match fields {
                    Some(fields) => {
                        for (name, t) in fields {
                            cmd.arg(name).arg(t.render_with(event, read).map_err(|e| format!("fields.{name}: {e}"))?);
                        }
                    }
                    None => {
                        cmd.arg("data").arg(json(event, payload));
                    }
                }
            }
            Op::Publish(message) => {
                cmd = redis::cmd("PUBLISH");
                cmd.arg(&key).arg(text_of(message)?);
                out.push(cmd);
                return Ok(());
            }
            Op::Push { left, value, keep } => {
                cmd = redis::cmd(if *left { "LPUSH" } else { "RPUSH" });
                cmd.arg(&key).arg(text_of(value)?);
                out.push(cmd);
                if let Some(keep) = keep {
                    let mut trim = redis::cmd("LTRIM");
                    // The newest items are at the head after LPUSH, at the tail after RPUSH.
                    if *left {
                        trim.arg(&key).arg(0).arg(i64::from(*keep) - 1);
                    } else {
                        trim.arg(&key).arg(-i64::from(*keep)).arg(-1);
                    }
                    out.push(trim);
                }
                self.push_ttl(&key, out);
                return Ok(());
            }
            Op::Del => {
                cmd = redis::cmd("DEL");
                cmd.arg(&key);
            }
        }
        out.push(cmd);
        self.push_ttl(&key, out);
        Ok(())
    }

    fn push_ttl(&self, key: &str, out: &mut Vec<redis::Cmd>) {
        if let Some(ms) = self.ttl_ms {
            let mut expire = redis::cmd("PEXPIRE");
            expire.arg(key).arg(ms);
            out.push(expire);
        }
    }
}

fn base_name(config: &CommandConfig) -> &'static str {
    match config {
        CommandConfig::Set(_) => "set",
        CommandConfig::Hset(_) => "hset",
        CommandConfig::Hincrby(_) => "hincrby",
        CommandConfig::Hincrbyfloat(_) => "hincrbyfloat",
        CommandConfig::Incrby(_) => "incrby",
        CommandConfig::Zadd(_) => "zadd",
        CommandConfig::Zincrby(_) => "zincrby",
        CommandConfig::Pfadd(_) => "pfadd",
        CommandConfig::Xadd(_) => "xadd",
        CommandConfig::Publish(_) => "publish",
        CommandConfig::Lpush(_) => "lpush",
        CommandConfig::Rpush(_) => "rpush",
        CommandConfig::Del(_) => "del",
    }
}

/// The payload's JSON text, written once per event whatever the commands.
fn json(event: &Event, payload: &mut Option<Vec<u8>>) -> Vec<u8> {
    payload
        .get_or_insert_with(|| {
            let mut text = Vec::with_capacity(event.data.json_len());
            event.data.write_json(&mut text);
            text
        })
        .clone()
}

fn float(n: &Number, event: &Event, read: &ReadFields) -> Result<f64, String> {
    match n {
        Number::Const(n) => Ok(*n),
        Number::Read(t) => {
            let text = t.render_with(event, read).map_err(|e| e.to_string())?;
            text.trim()
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .ok_or_else(|| format!("the amount is not a number ({})", describe_str(&text)))
        }
    }
}

fn integer(n: &Number, event: &Event, read: &ReadFields) -> Result<i64, String> {
    match n {
        Number::Const(n) => Ok(*n as i64),
        Number::Read(t) => {
            let text = t.render_with(event, read).map_err(|e| e.to_string())?;
            text.trim().parse::<i64>().map_err(|_| format!("the amount is not an integer ({})", describe_str(&text)))
        }
    }
}
