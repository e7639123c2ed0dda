//! `gantry-cli`: the two binaries, `gantry` (every command) and `gantry-worker` (the worker
//! alone, for container images), and what they share: the commands ([`cmd`]), the process
//! set-up ([`process`]) and the one error type with its exit codes ([`error`]).

pub mod args;
pub mod cmd;
pub mod error;
pub mod process;
