//! Errors shown with their causes.
//!
//! sluice's error types name the step that failed in their message and keep
//! the cause as their `source`, so each cause is printed once: the binary
//! prints the chain with anyhow's `{:#}`; logs and messages built inside the
//! library use [`chain`].

use std::fmt;

/// Displays `error` and its sources, joined by `": "`.
pub fn chain<'a>(error: &'a (dyn std::error::Error + 'static)) -> Chain<'a> {
    Chain(error)
}

/// See [`chain`].
pub struct Chain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading {path}")]
    struct ReadFailed {
        path: &'static str,
        source: std::io::Error,
    }

    #[test]
    fn prints_each_cause_once() {
        let error = ReadFailed {
            path: "a.pem",
            source: std::io::Error::other("gone"),
        };
        assert_eq!(chain(&error).to_string(), "reading a.pem: gone");
    }
}
