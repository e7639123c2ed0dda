//! Chat templates rendered in a renderer child (this test binary, started as one):
//! real templates render exactly as in-process; hostile ones that would stop an in-process
//! renderer (a hang outside the step budget, memory built up unseen, a stack overflow) cost one
//! render a clear error, and the next render gets a fresh child.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use gantry_engine::chat::{ChatTemplate, ChildLimits, Message, TemplateIsolation};
use serde_json::Value;

fn child(deadline_s: f64, memory_mib: u64) -> TemplateIsolation {
    TemplateIsolation::Child(ChildLimits {
        program: support::this_binary(),
        memory_bytes: memory_mib << 20,
        deadline: Duration::from_secs_f64(deadline_s),
    })
}

fn isolated(source: &str, isolation: &TemplateIsolation) -> ChatTemplate {
    ChatTemplate::isolated(source, "model", "<s>", "</s>", isolation).unwrap()
}

fn user(n: usize) -> Vec<Message> {
    (0..n).map(|i| Message::new(if i % 2 == 0 { "user" } else { "assistant" }, &format!("message {i}"))).collect()
}

fn render_error(t: &ChatTemplate, messages: &[Message]) -> String {
    t.render(messages, true, &Default::default()).unwrap_err().to_string()
}

fn real_templates_render_the_same_in_a_renderer_child() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/chat-templates");
    let isolation = child(10.0, 1024);
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let f: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let (source, bos, eos) = (
            f["template"].as_str().unwrap(),
            f["bos_token"].as_str().unwrap_or(""),
            f["eos_token"].as_str().unwrap_or(""),
        );
        let here = ChatTemplate::new(source, "model", bos, eos).unwrap();
        let there = ChatTemplate::isolated(source, "model", bos, eos, &isolation).unwrap();
        let extra = f["extra"].as_object().cloned().unwrap_or_default();
        for case in f["cases"].as_array().unwrap() {
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let agp = case["add_generation_prompt"].as_bool().unwrap();
            let (a, b) = (here.render(&messages, agp, &extra), there.render(&messages, agp, &extra));
            assert_eq!(a.map_err(|e| e.to_string()), b.map_err(|e| e.to_string()), "{}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 90, "{checked} cases");
}

fn hostile_templates_cost_one_render_an_error_and_the_renderer_starts_again() {
    let isolation = child(3.0, 256);
    // Each is hostile only past one message, so the same template then renders again.
    let cases = [
        (
            "a sequence repeated outside the step budget",
            "{% set n = 1000000000000 %}{{ ([] * n) ~ '' }}",
            "chat template: the chat template did not finish within 3 s (a loop the step budget does not see?); its renderer was stopped",
        ),
        (
            "text doubled without being written",
            "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
            "chat template: the chat template asked for more memory than its renderer may use (256 MiB; signal 6); that render was stopped",
        ),
        (
            "nesting 100,000 deep",
            "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = [ns.l] %}{% endfor %}{{ ns.l }}",
            "chat template: the chat template nested too deeply and overflowed its renderer's stack (signal 6); that render was stopped",
        ),
        (
            "a loop past the step budget (minijinja's own limit, through the child)",
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "chat template: the chat template ran past 20000000 steps (a runaway loop?); it was stopped",
        ),
        (
            "an exception the template raises",
            "{{ raise_exception('Conversation roles must alternate') }}",
            "chat template: Conversation roles must alternate",
        ),
    ];
    for (what, hostile, error) in cases {
        let source = format!(
            "{{% if messages | length > 1 %}}{hostile}{{% else %}}ok: {{{{ messages[0].content }}}}{{% endif %}}"
        );
        let t = isolated(&source, &isolation);
        assert_eq!(t.render(&user(1), true, &Default::default()).unwrap(), "ok: message 0", "{what}");
        let started = Instant::now();
        assert_eq!(render_error(&t, &user(2)), error, "{what}");
        assert!(started.elapsed() < Duration::from_secs(8), "{what}: {:?}", started.elapsed());
        // The same template, a fresh child (where the last one died) or the same one.
        assert_eq!(t.render(&user(1), true, &Default::default()).unwrap(), "ok: message 0", "{what}, after");
        assert_eq!(render_error(&t, &user(3)), error, "{what}, again");
    }
}

fn a_template_that_does_not_compile_or_a_renderer_that_cannot_start_is_known_at_once() {
    let e = ChatTemplate::isolated("{% for %}", "model", "", "", &child(5.0, 256)).unwrap_err().to_string();
    assert!(e.starts_with("chat template: the chat template does not compile: syntax error: "), "{e}");
    // minijinja folds constant expressions when it compiles, so this one runs (forever) then.
    let e = ChatTemplate::isolated("{{ ([] * 1000000000000) ~ '' }}", "model", "", "", &child(1.0, 256)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "chat template: the chat template did not finish within 1 s (a loop the step budget does not see?); its renderer was stopped"
    );
    let missing = TemplateIsolation::Child(ChildLimits {
        program: PathBuf::from("/nonexistent/gantry"),
        memory_bytes: 256 << 20,
        deadline: Duration::from_secs(5),
    });
    let e = ChatTemplate::isolated("{{ 1 }}", "model", "", "", &missing).unwrap_err().to_string();
    assert_eq!(
        e,
        "chat template: cannot start the chat-template renderer (/nonexistent/gantry): No such file or directory (os error 2)"
    );
}

fn one_renderer_compiles_template_after_template_in_the_same_child() {
    use gantry_engine::chat_child::ChildRenderer;
    let TemplateIsolation::Child(limits) = child(5.0, 256) else { unreachable!() };
    let none = Default::default();
    let mut r = ChildRenderer::start(&limits, "A{{ messages | length }}", "model", "", "").unwrap();
    assert_eq!(r.render(&user(2), true, &none).unwrap(), "A2");
    let pid = r.pid().unwrap();
    r.recompile("B{{ messages[0].content }}", "model", "", "").unwrap();
    assert_eq!(r.render(&user(1), true, &none).unwrap(), "Bmessage 0");
    // A template that does not compile leaves none: renders say so instead of using the last.
    let e = r.recompile("{% if %}", "model", "", "").unwrap_err().to_string();
    assert!(e.starts_with("chat template: the chat template does not compile: "), "{e}");
    assert_eq!(
        r.render(&user(1), true, &none).unwrap_err().to_string(),
        "chat template: renderer: no template was compiled"
    );
    r.recompile("C", "model", "", "").unwrap();
    assert_eq!(r.render(&user(1), true, &none).unwrap(), "C");
    assert_eq!(r.pid(), Some(pid), "the same child throughout");
}

fn main() {
    support::main(&[
        ("real_templates_render_the_same_in_a_renderer_child", real_templates_render_the_same_in_a_renderer_child),
        (
            "hostile_templates_cost_one_render_an_error_and_the_renderer_starts_again",
            hostile_templates_cost_one_render_an_error_and_the_renderer_starts_again,
        ),
        (
            "a_template_that_does_not_compile_or_a_renderer_that_cannot_start_is_known_at_once",
            a_template_that_does_not_compile_or_a_renderer_that_cannot_start_is_known_at_once,
        ),
        (
            "one_renderer_compiles_template_after_template_in_the_same_child",
            one_renderer_compiles_template_after_template_in_the_same_child,
        ),
    ]);
}
