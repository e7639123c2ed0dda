//! Errors of the `gantry` and `gantry-worker` commands and the exit codes they map to (BSD
//! `sysexits.h`), the same in both binaries.

use std::fmt;

use gantry_model::FilesError;
use gantry_store::HubError;

/// A failed command: a one-line message and an exit code.
#[derive(Debug)]
pub struct CliError {
    message: String,
    code: u8,
}

impl CliError {
    /// Bad flags or values (`EX_USAGE`).
    pub const USAGE: u8 = 64;
    /// A model whose files are wrong (`EX_DATAERR`).
    pub const DATA: u8 = 65;
    /// A path or model that does not exist (`EX_NOINPUT`).
    pub const NO_INPUT: u8 = 66;
    /// A service (the Hub, the controller, a port) is not there (`EX_UNAVAILABLE`).
    pub const UNAVAILABLE: u8 = 69;
    /// A bug or an unexpected failure (`EX_SOFTWARE`).
    pub const SOFTWARE: u8 = 70;
    /// Reading or writing failed (`EX_IOERR`).
    pub const IO: u8 = 74;
    /// Refused: a token is missing or may not read it (`EX_NOPERM`).
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

impl From<HubError> for CliError {
    fn from(e: HubError) -> CliError {
        let code = match &e {
            HubError::Gated { .. } | HubError::Unauthorized { .. } => CliError::NO_PERMISSION,
            HubError::RepoNotFound { .. } | HubError::RevisionNotFound { .. } | HubError::FileNotFound { .. } => {
                CliError::NO_INPUT
            }
            HubError::BadId(_) | HubError::AmbiguousGguf { .. } => CliError::USAGE,
            HubError::Checksum { .. } | HubError::NothingToServe { .. } | HubError::UnsafePath(_) => CliError::DATA,
            HubError::Unreachable { .. }
            | HubError::Http { .. }
            | HubError::Transfer { .. }
            | HubError::OfflineMiss { .. } => CliError::UNAVAILABLE,
            HubError::Io { .. } => CliError::IO,
        };
        CliError { message: e.to_string(), code }
    }
}

impl From<FilesError> for CliError {
    fn from(e: FilesError) -> CliError {
        let code = match &e {
            FilesError::NotFound { .. } | FilesError::MissingShard { .. } => CliError::NO_INPUT,
            FilesError::Io { .. } => CliError::IO,
            FilesError::Ambiguous { .. } => CliError::USAGE,
            FilesError::Model { .. } | FilesError::NotAModel { .. } => CliError::DATA,
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
