//! Errors shared by the codecs of handler data (the opaque bytes each file
//! entry of a record carries). Each handler documents its own layout beside
//! its code; they all read through [`super::wire::WireReader`], so a short or
//! hostile input is an error, never a panic.

use super::wire::Truncated;

/// Why a handler's data was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    /// The data has another length than its layout says (`EINVAL`).
    #[error("handler data is {found} bytes, its layout needs {expected}")]
    WrongLength {
        /// Bytes the layout needs.
        expected: u64,
        /// Bytes present.
        found: usize,
    },
    /// The data ends before its layout does (`EINVAL`).
    #[error("handler data truncated: {needed} bytes needed at offset {offset}")]
    Truncated {
        /// Offset of the read.
        offset: usize,
        /// Bytes it needed.
        needed: usize,
    },
    /// A reserved field is not zero (`EINVAL`).
    #[error("reserved field {field} is not zero")]
    ReservedNotZero {
        /// The field.
        field: &'static str,
    },
    /// A field has a value its meaning forbids (`EINVAL`).
    #[error("field {field} = {value:#x}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A field uses bits or values this version does not know
    /// (`EOPNOTSUPP`).
    #[error(
        "field {field} = {value:#x} has bits or values this version does not support (EOPNOTSUPP)"
    )]
    Unsupported {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
}

impl BlobError {
    /// The errno for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            BlobError::Unsupported { .. } => libc::EOPNOTSUPP,
            _ => libc::EINVAL,
        }
    }
}

impl From<Truncated> for BlobError {
    fn from(truncated: Truncated) -> BlobError {
        BlobError::Truncated {
            offset: truncated.offset,
            needed: truncated.needed,
        }
    }
}
