//! Errors plugins return: at build time ([`BuildError`]) and at run time ([`PluginError`]).

type Source = Box<dyn std::error::Error + Send + Sync>;

/// A run-time failure of a component. The engine decides what follows:
/// retry with backoff, reconnect, or stop the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The connection is gone; the engine reconnects with backoff.
    #[error("not connected: {message}")]
    NotConnected {
        message: String,
        #[source]
        source: Option<Source>,
    },
    /// A transient failure; the same call may succeed later.
    #[error("{message}")]
    Retryable {
        message: String,
        #[source]
        source: Option<Source>,
    },
    /// Will not succeed by retrying; the engine fails the batch.
    #[error("{message}")]
    Fatal {
        message: String,
        #[source]
        source: Option<Source>,
    },
    /// An output wrote the batch except these events, which will never
    /// succeed (a row the database refuses, a template field missing). The
    /// engine sends them to the output's `error` port and acknowledges the rest.
    #[error("{} of the batch refused, the first: {}", events_text(.0.len()), .0.first().map_or("", |f| f.reason.as_str()))]
    Partial(Vec<FailedEvent>),
}

/// One event of a batch an output refused for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedEvent {
    /// Its index in the batch given to `write`.
    pub index: usize,
    pub reason: String,
}

impl FailedEvent {
    pub fn new(index: usize, reason: impl std::fmt::Display) -> Self {
        FailedEvent { index, reason: reason.to_string() }
    }
}

fn events_text(n: usize) -> String {
    if n == 1 {
        "1 event".into()
    } else {
        format!("{n} events")
    }
}

impl PluginError {
    pub fn retryable(message: impl Into<String>) -> Self {
        PluginError::Retryable { message: message.into(), source: None }
    }

    pub fn fatal(message: impl Into<String>) -> Self {
        PluginError::Fatal { message: message.into(), source: None }
    }

    pub fn not_connected(message: impl Into<String>) -> Self {
        PluginError::NotConnected { message: message.into(), source: None }
    }

    /// Wraps a source error as retryable, with context.
    pub fn retryable_from(message: impl Into<String>, source: impl Into<Source>) -> Self {
        PluginError::Retryable { message: message.into(), source: Some(source.into()) }
    }

    /// Wraps a source error as fatal, with context.
    pub fn fatal_from(message: impl Into<String>, source: impl Into<Source>) -> Self {
        PluginError::Fatal { message: message.into(), source: Some(source.into()) }
    }

    /// Whether retrying the same operation can help.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, PluginError::Fatal { .. } | PluginError::Partial(_))
    }

    /// The message with every source in the chain, for logs and metadata.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    }
}

/// A configuration problem found while building a component, before any I/O.
///
/// `path` locates the offending option inside the component's config
/// (`["window", "tumbling"]`); `offset` optionally points inside a string
/// option (a line and column within an inline script), both 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BuildError {
    pub path: Vec<String>,
    pub message: String,
    pub offset: Option<(usize, usize)>,
    /// What kind of mistake it is, so that the loader can point at it
    /// without reading the message.
    pub kind: BuildErrorKind,
}

/// What kind of mistake a [`BuildError`] is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum BuildErrorKind {
    /// A value the component refused (the default).
    #[default]
    Invalid,
    /// An option the component does not have (a typo, most often).
    UnknownField(String),
    /// A required option left out.
    MissingField(String),
    /// A string where another type was expected: a `${VAR}` interpolation
    /// may be taken again as the number or boolean its text spells.
    StringForOtherType,
}

impl BuildError {
    /// An error about the component as a whole.
    pub fn new(message: impl Into<String>) -> Self {
        BuildError { path: Vec::new(), message: message.into(), offset: None, kind: BuildErrorKind::Invalid }
    }

    /// An error about one option, given by its path.
    pub fn at<S: Into<String>>(path: impl IntoIterator<Item = S>, message: impl Into<String>) -> Self {
        BuildError {
            path: path.into_iter().map(Into::into).collect(),
            message: message.into(),
            offset: None,
            kind: BuildErrorKind::Invalid,
        }
    }

    /// Points inside a string option (1-based line and column within it).
    pub fn with_offset(mut self, line: usize, column: usize) -> Self {
        self.offset = Some((line, column));
        self
    }
}
