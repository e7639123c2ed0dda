//! Errors of the `gantry` command and the exit codes they map to (BSD `sysexits.h`).

use std::fmt;

use gantry_worker::store::StoreError;

/// A failed command: a one-line message and an exit code.
#[derive(Debug)]
pub struct CliError {
    message: String,
    code: u8,
}

impl CliError {
    /// Bad flags or values (`EX_USAGE`).
    pub const USAGE: u8 = 64;
    /// A model file or folder whose content is wrong (`EX_DATAERR`).
    pub const DATA: u8 = 65;
    /// A path that does not exist (`EX_NOINPUT`).
    pub const NO_INPUT: u8 = 66;
    /// A service (the controller, a port) is not there (`EX_UNAVAILABLE`).
    pub const UNAVAILABLE: u8 = 69;
    /// A bug or an unexpected failure (`EX_SOFTWARE`).
    pub const SOFTWARE: u8 = 70;
    /// Reading failed (`EX_IOERR`).
    pub const IO: u8 = 74;
    /// Refused: a key or token is missing or wrong (`EX_NOPERM`).
    pub const NO_PERMISSION: u8 = 77;

    /// A usage error: the user asked for something invalid.
    pub fn usage(message: impl Into<String>) -> CliError {
        CliError { message: message.into(), code: Self::USAGE }
    }

    /// A message with an explicit exit code.
    pub fn with_code(message: impl Into<String>, code: u8) -> CliError {
        CliError { message: message.into(), code }
    }

    /// The exit code.
    pub fn code(&self) -> u8 {
        self.code
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<gantry_worker::cli::Failure> for CliError {
    fn from(f: gantry_worker::cli::Failure) -> CliError {
        CliError { message: f.message, code: f.code }
    }
}

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> CliError {
        let code = match &e {
            StoreError::NotFound { .. } | StoreError::MissingShard { .. } => CliError::NO_INPUT,
            StoreError::Io { .. } => CliError::IO,
            StoreError::Ambiguous { .. } => CliError::USAGE,
            StoreError::Model { .. } | StoreError::NotAModel { .. } => CliError::DATA,
        };
        CliError { message: e.to_string(), code }
    }
}

impl From<gantry_core::Error> for CliError {
    fn from(e: gantry_core::Error) -> CliError {
        let code = match e {
            gantry_core::Error::InvalidInput { .. } | gantry_core::Error::NotInCatalog { .. } => CliError::USAGE,
            _ => CliError::DATA,
        };
        CliError { message: e.to_string(), code }
    }
}

impl From<serde_json::Error> for CliError {
    fn from(e: serde_json::Error) -> CliError {
        CliError { message: format!("cannot write JSON: {e}"), code: 1 }
    }
}
