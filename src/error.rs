//! The library's one error type. Every message names the file, field or tensor at fault, so a
//! user can fix the input without reading the source.

use std::path::PathBuf;

/// Everything that can go wrong in the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The OS error is part of the message and deliberately not a `source`: `{:#}` in the
    // binary would print it a second time.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: no such file or directory")]
    Missing { path: PathBuf },
    #[error("{path}: cannot decode image: {reason}")]
    BadImage { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    BadData { path: PathBuf, reason: String },
    #[error(
        "{path}: unknown dataset format ({reason}); pass --data-format imagefolder|cifar10|cifar100|idx|builtin"
    )]
    UnknownFormat { path: PathBuf, reason: String },
    #[error(
        "recipe{}: key `{key}`: {reason}",
        if origin.is_empty() { String::new() } else { format!(" {origin}") }
    )]
    Recipe {
        origin: String,
        key: String,
        reason: String,
    },
    #[error("unknown model `{name}`; known models: {known}")]
    UnknownModel { name: String, known: String },
    #[error("checkpoint {path} does not fit model `{model}`: {reason}")]
    CheckpointMismatch {
        path: PathBuf,
        model: String,
        reason: String,
    },
    #[error("{path}: not a convlab run folder ({reason})")]
    BadRun { path: PathBuf, reason: String },
    #[error(
        "training diverged at epoch {epoch}, step {step}: loss is {loss}; {}",
        match kept {
            Some(p) => format!("the last good checkpoint is kept in {}", p.display()),
            None => "no epoch had finished, so there is no good checkpoint to keep (try a lower --lr)".into(),
        }
    )]
    Diverged {
        epoch: usize,
        step: usize,
        loss: f32,
        /// The checkpoint that stays valid, if an epoch had finished.
        kept: Option<PathBuf>,
    },
    #[error(
        "{path}: the run folder is in use by {holder} (a training or experiment writing it); wait for it to end or pick another folder"
    )]
    Locked { path: PathBuf, holder: String },
    #[error("{0}")]
    Invalid(String),
}

/// Shorthand used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::Missing { path }
        } else {
            Error::Io { path, err: source }
        }
    }
}
