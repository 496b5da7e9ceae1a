//! Saved vCPU and VM state (placeholder until the state module lands).

/// A malformed saved-state record.
#[derive(Debug, thiserror::Error)]
#[error("malformed saved state")]
pub struct StateFormatError;
