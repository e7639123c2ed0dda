//! One module per command (or family of commands) of `gantry`.

pub mod bench;
pub mod client;
pub mod generate;
pub mod inspect;
pub mod measurements;
pub mod pull;
pub mod select;
pub mod sources;
pub mod table;
pub mod up;
pub mod worker;
