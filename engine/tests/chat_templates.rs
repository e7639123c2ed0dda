//! Chat templates rendered by Gantry against transformers' `apply_chat_template` renderings of
//! nine real templates (fixtures/chat-templates): byte-identical prompts, the same errors.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use gantry_engine::chat::{ChatTemplate, Message};
use serde_json::Value;

fn fixtures() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/chat-templates");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            (
                p.file_stem().unwrap().to_string_lossy().into_owned(),
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn every_real_template_renders_byte_identical_to_transformers() {
    let all = fixtures();
    assert!(all.len() >= 9, "{} template fixtures", all.len());
    let mut checked = 0;
    for (name, f) in &all {
        let t = ChatTemplate::new(
            f["template"].as_str().unwrap(),
            name,
            f["bos_token"].as_str().unwrap_or(""),
            f["eos_token"].as_str().unwrap_or(""),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let extra = f["extra"].as_object().cloned().unwrap_or_default();
        for (i, case) in f["cases"].as_array().unwrap().iter().enumerate() {
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let agp = case["add_generation_prompt"].as_bool().unwrap();
            let got = t.render(&messages, agp, &extra);
            match (case.get("rendered"), case.get("error")) {
                (Some(want), _) => {
                    let got = got.unwrap_or_else(|e| panic!("{name} case {i}: {e}"));
                    assert_eq!(got, want.as_str().unwrap(), "{name} case {i} (add_generation_prompt={agp})");
                }
                (None, Some(err)) => {
                    let e = got.expect_err(&format!("{name} case {i} must fail")).to_string();
                    assert_eq!(e, format!("chat template: {}", err.as_str().unwrap()), "{name} case {i}");
                }
                _ => panic!("{name} case {i} has neither rendered nor error"),
            }
            checked += 1;
        }
    }
    assert!(checked >= 90, "{checked} cases");
}
