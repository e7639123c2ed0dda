//! The input both chat-template targets read (a template and a conversation), and how the
//! renderer child takes one: shared by the cargo-fuzz targets and the replay of their corpus in
//! the normal test suite (`engine/tests/fuzz_replay.rs`).

#![allow(dead_code)]

use arbitrary::Arbitrary;
use gantry_engine::chat::Message;
use gantry_engine::chat_child::{ChildLimits, ChildRenderer, Reply};

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

/// Compiles `input`'s template in the renderer child (starting one when there is none) and
/// renders its conversation, the way a worker does. A template that hangs, runs out of memory
/// or overflows the stack costs its child, which is started again next time; what must never
/// happen is minijinja panicking — that is the `Err`.
pub fn render_in_child(
    renderer: &mut Option<ChildRenderer>,
    limits: &ChildLimits,
    input: &Input,
) -> Result<(), String> {
    let compiled = match renderer.as_mut() {
        Some(r) => r.recompile(&input.template, "fuzz", "<s>", "</s>").map(|_| ()),
        None => ChildRenderer::start(limits, &input.template, "fuzz", "<s>", "</s>").map(|r| {
            *renderer = Some(r);
        }),
    };
    if let Err(e) = compiled {
        return if e.to_string().contains("renderer panicked") { Err(e.to_string()) } else { Ok(()) };
    }
    let Some(r) = renderer.as_mut() else { return Ok(()) };
    match r.render_reply(&input.messages(), input.add_generation_prompt, &Default::default()) {
        Ok(Reply::Panic(p)) => Err(format!("minijinja panicked in the renderer: {p}")),
        _ => Ok(()),
    }
}
