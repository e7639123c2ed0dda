//! The chat-template renderer: a model's Jinja template (hostile: it comes with the model)
//! compiled and rendered over a fuzzed conversation.
#![no_main]

use arbitrary::Arbitrary;
use gantry_worker::engine::chat::{ChatTemplate, Message};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    template: String,
    messages: Vec<(u8, String)>,
    add_generation_prompt: bool,
}

fuzz_target!(|input: Input| {
    let Ok(template) = ChatTemplate::new(&input.template, "fuzz", "<s>", "</s>") else { return };
    let roles = ["system", "user", "assistant", "tool"];
    let messages: Vec<Message> = input
        .messages
        .iter()
        .take(16)
        .map(|(r, c)| Message::new(roles[usize::from(*r) % roles.len()], c))
        .collect();
    let _ = template.render(&messages, input.add_generation_prompt, &Default::default());
});
