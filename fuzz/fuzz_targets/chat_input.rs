//! The input both chat-template targets read: a template and a conversation.

use arbitrary::Arbitrary;
use gantry_worker::engine::chat::Message;

#[derive(Debug, Arbitrary)]
pub struct Input {
    pub template: String,
    pub messages: Vec<(u8, String)>,
    pub add_generation_prompt: bool,
}

impl Input {
    /// Up to 16 messages, each role one of the four a worker accepts.
    pub fn messages(&self) -> Vec<Message> {
        let roles = ["system", "user", "assistant", "tool"];
        self.messages.iter().take(16).map(|(r, c)| Message::new(roles[usize::from(*r) % roles.len()], c)).collect()
    }
}
