//! Errors of the `gantry` command and the exit codes they map to (BSD `sysexits.h`).

use std::fmt;

use gantry_worker::cli::Failure;
use gantry_worker::store::StoreError;

/// A failed command: a one-line message and an exit code.
#[derive(Debug)]
pub struct CliError {
    message: String,
    code: u8,
}

impl CliError {
    // The exit codes (BSD `sysexits.h`) are the worker's, so every Gantry binary agrees.
    pub const USAGE: u8 = Failure::USAGE;
    pub const DATA: u8 = Failure::DATA;
    pub const NO_INPUT: u8 = Failure::NO_INPUT;
    pub const UNAVAILABLE: u8 = Failure::UNAVAILABLE;
    pub const SOFTWARE: u8 = Failure::SOFTWARE;
    pub const IO: u8 = Failure::IO;
    pub const NO_PERMISSION: u8 = Failure::NO_PERMISSION;

    /// A usage error: the user asked for something invalid.
    pub fn usage(message: impl Into<String>) -> CliError {
        CliError { message: message.into(), code: Self::USAGE }
    }

    /// A message with an explicit exit code.
    pub fn with_code(message: impl Into<String>, code: u8) -> CliError {
        CliError { message: message.into(), code }
    }

    /// The exit code.
    pub fn message(&self) -> &str {
        &self.message
    }

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
