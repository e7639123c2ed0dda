//! The chat-template renderer: a model's Jinja template (hostile: it comes with the model)
//! compiled and rendered over a fuzzed conversation.
#![no_main]

#[path = "chat_input.rs"]
mod chat_input;

use chat_input::Input;
use gantry_engine::chat::ChatTemplate;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: Input| {
    let Ok(template) = ChatTemplate::new(&input.template, "fuzz", "<s>", "</s>") else { return };
    let messages = input.messages();
    let _ = template.render(&messages, input.add_generation_prompt, &Default::default());
});
