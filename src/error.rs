//! Which failures are the user's: the binary's errors are `anyhow` chains, and the exit status
//! is decided by the first cause in the chain that is either a [`BadInput`] or a
//! [`ModelError`] about a file (config, checkpoint, tokenizer) or an argument: exit 2 for what
//! the user can fix in their input (config, arguments, data, a missing or unreadable file), 1
//! for runtime failures (a device, an actor, a full disk).

use std::fmt;

use tandem_models::ModelError;
use tandem_runtime::RuntimeError;

/// Exit status for bad input, matching clap's status for usage errors.
pub const EXIT_BAD_INPUT: u8 = 2;
/// Exit status for everything else.
pub const EXIT_FAILURE: u8 = 1;

/// An error caused by what the user asked for (an argument, or a file they named).
#[derive(Debug)]
pub struct BadInput(pub String);

impl fmt::Display for BadInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// `Err(BadInput)` as an `anyhow` error, for `return bad_input!(...)` style early exits.
macro_rules! bad_input {
    ($($arg:tt)*) => {
        Err(anyhow::Error::new($crate::error::BadInput(format!($($arg)*))))
    };
}
pub(crate) use bad_input;

/// Checks an output file named on the command line before any work is done: its directory
/// must exist and it must not be a directory. Every command treats output files this way (a
/// missing directory is bad input, exit 2, and is never created); run directories are the
/// exception, created with their parents.
pub fn check_output_path(path: &std::path::Path) -> anyhow::Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = parent.filter(|d| !d.is_dir()) {
        return bad_input!(
            "{}: the directory {} does not exist (create it first; output files get no new directories)",
            path.display(),
            dir.display()
        );
    }
    if path.is_dir() {
        return bad_input!("{}: is a directory, not a file to write", path.display());
    }
    Ok(())
}

/// The error and its causes joined by ": ", as `{:#}` does, except that a cause whose text
/// already ends the line is left out: an error that shows its source (`"{path}: {source}"`)
/// would otherwise print the OS error twice.
pub fn chain_text(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// The process exit status for an error chain.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if cause.is::<BadInput>() {
            return EXIT_BAD_INPUT;
        }
        if let Some(e) = cause.downcast_ref::<RuntimeError>() {
            // Config, prompts and files named by the user; not actor or tensor failures.
            return match e {
                RuntimeError::Config { .. } | RuntimeError::Prompts { .. } | RuntimeError::InvalidArgument(_) => {
                    EXIT_BAD_INPUT
                }
                RuntimeError::Io { source, .. } | RuntimeError::Model(ModelError::Io { source, .. }) => {
                    io_exit_code(source)
                }
                RuntimeError::Model(ModelError::Candle(_)) => EXIT_FAILURE,
                RuntimeError::Model(_) => EXIT_BAD_INPUT,
                _ => EXIT_FAILURE,
            };
        }
        if let Some(e) = cause.downcast_ref::<ModelError>() {
            // Everything but a tensor-library failure is about a file or argument the user gave.
            return match e {
                ModelError::Candle(_) => EXIT_FAILURE,
                ModelError::Io { source, .. } => io_exit_code(source),
                _ => EXIT_BAD_INPUT,
            };
        }
    }
    EXIT_FAILURE
}

/// A file error is the user's to fix (exit 2) when the file is missing, unreadable, of the
/// wrong kind or malformed; running out of space or quota, or any other failure of the system,
/// is a runtime failure (exit 1).
fn io_exit_code(e: &std::io::Error) -> u8 {
    use std::io::ErrorKind::*;
    match e.kind() {
        NotFound | PermissionDenied | AlreadyExists | InvalidInput | InvalidData | NotADirectory | IsADirectory
        | DirectoryNotEmpty | ReadOnlyFilesystem | InvalidFilename | UnexpectedEof => EXIT_BAD_INPUT,
        _ => EXIT_FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn bad_input_anywhere_in_the_chain_exits_2() {
        let e: anyhow::Result<()> = bad_input!("no such thing");
        let e = e.context("loading").unwrap_err();
        assert_eq!(exit_code(&e), EXIT_BAD_INPUT);
        assert_eq!(format!("{e:#}"), "loading: no such thing");
    }

    #[test]
    fn a_cause_the_message_already_shows_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory (os error 2)");
        let e = anyhow::Error::new(ModelError::Io {
            path: "x.toml".into(),
            source: io,
        })
        .context("run x.toml");
        assert_eq!(format!("{e:#}").matches("os error 2").count(), 2, "{e:#}");
        assert_eq!(
            chain_text(&e),
            "run x.toml: x.toml: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn model_errors_are_classified() {
        let e = anyhow::Error::new(ModelError::InvalidArgument("x".into()));
        assert_eq!(exit_code(&e), EXIT_BAD_INPUT);
        let e = anyhow::Error::new(ModelError::Candle(candle_core::Error::Msg("oom".into())));
        assert_eq!(exit_code(&e), EXIT_FAILURE);
        assert_eq!(exit_code(&anyhow::anyhow!("other")), EXIT_FAILURE);
    }
}
