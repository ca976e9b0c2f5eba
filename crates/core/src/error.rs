//! The core's one error type. The core does no file I/O, so its errors are about what a caller
//! passed in: a model shape it cannot build, sizes that do not fit, values a quantizer cannot
//! hold, or a backend that failed. Each message names the field or the quantity; the layers
//! above add the file name.

use crate::backend::BackendError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model configuration kiln cannot build (the message names the field).
    #[error("{0}")]
    Config(String),
    /// Sizes or ids that do not fit the model: a sequence longer than its context, a token
    /// beyond its vocabulary, a tensor of the wrong length.
    #[error("{0}")]
    Shape(String),
    /// Values a quantization scheme cannot encode or bytes it cannot decode.
    #[error("{0}")]
    Quant(String),
    /// A model or batch that needs more memory than the backend has (the message gives both,
    /// and what to lower).
    #[error("{0}")]
    Memory(String),
    /// The backend could not allocate, transfer or run.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `return Err(Error::$kind(format!(…)))`.
#[macro_export]
macro_rules! fail {
    ($kind:ident, $($message:tt)*) => {
        return Err($crate::Error::$kind(format!($($message)*)))
    };
}

/// `if !cond { fail!($kind, …) }`.
#[macro_export]
macro_rules! require {
    ($cond:expr, $kind:ident, $($message:tt)*) => {
        if !$cond {
            $crate::fail!($kind, $($message)*);
        }
    };
}
