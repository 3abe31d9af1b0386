//! What a checker returns when it finds something: what broke, and a readable dump.

use std::fmt;

/// A checker failure: a one-paragraph description and a dump of the state (trees rendered
/// with `iopt_sim::debug::render`, the model, the device's caches, the last operations).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What went wrong.
    pub what: String,
    /// The state when it went wrong.
    pub dump: String,
}

impl Failure {
    /// A failure with a dump.
    #[must_use]
    pub fn new(what: impl Into<String>, dump: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            dump: dump.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.what)?;
        if !self.dump.is_empty() {
            write!(f, "--- dump ---\n{}", self.dump)?;
        }
        Ok(())
    }
}

impl std::error::Error for Failure {}

/// The result of a check.
pub type Outcome = Result<(), Failure>;
