//! Chat templates: the model's Jinja `chat_template`, rendered with minijinja configured the way
//! transformers configures jinja2, so prompts are byte-identical to `apply_chat_template`.
//! Models without a template get a documented default chosen by their vocabulary.

use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use super::EngineError;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.to_string(), content: content.to_string() }
    }
}

/// A compiled chat template with the special tokens it may refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where it came from: `model` or `default:<name>`.
    pub origin: String,
    bos_token: String,
    eos_token: String,
}

const NAME: &str = "chat";

/// Default templates for models that ship none, picked by the special tokens their vocabulary
/// has. Each is the format that family's instruct models use.
pub const DEFAULTS: [(&str, &str, &str); 6] = [
    (
        "chatml",
        "<|im_start|>",
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}\
         {% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    ),
    (
        "llama3",
        "<|start_header_id|>",
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}\
         {% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    ),
    (
        "gemma",
        "<start_of_turn>",
        "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\n\n' %}\
         {% else %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}{{ '<start_of_turn>' + role + '\n' + ns.system + m['content'] | trim + '<end_of_turn>\n' }}{% set ns.system = '' %}{% endif %}{% endfor %}\
         {% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
    ),
    (
        "phi3",
        "<|assistant|>",
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}\
         {% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}",
    ),
    (
        "mistral",
        "[INST]",
        "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\n\n' %}\
         {% elif m['role'] == 'user' %}{{ '[INST] ' + ns.system + m['content'] + ' [/INST]' }}{% set ns.system = '' %}\
         {% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}",
    ),
    (
        "plain",
        "",
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}\
         {% else %}{{ 'Assistant: ' + m['content'] + '\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}",
    ),
];

impl ChatTemplate {
    /// Compiles a template.
    pub fn new(source: &str, origin: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, EngineError> {
        let mut env = environment();
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| EngineError::Template(format!("the chat template does not compile: {e}")))?;
        Ok(ChatTemplate { env, origin: origin.to_string(), bos_token: bos_token.into(), eos_token: eos_token.into() })
    }

    /// The default template for a vocabulary: the first whose marker token it has.
    pub fn default_for(
        has_token: &dyn Fn(&str) -> bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<ChatTemplate, EngineError> {
        let (name, _, source) = DEFAULTS
            .iter()
            .find(|(_, marker, _)| marker.is_empty() || has_token(marker))
            .expect("the plain default has no marker");
        ChatTemplate::new(source, &format!("default:{name}"), bos_token, eos_token)
    }

    /// Renders `messages`; `extra` adds template variables (e.g. `date_string`).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, EngineError> {
        let tmpl = self.env.get_template(NAME).map_err(|e| EngineError::Template(e.to_string()))?;
        let mut ctx = serde_json::Map::new();
        ctx.insert(
            "messages".into(),
            serde_json::to_value(messages).map_err(|e| EngineError::Template(e.to_string()))?,
        );
        ctx.insert("tools".into(), serde_json::Value::Null);
        ctx.insert("documents".into(), serde_json::Value::Null);
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        ctx.insert("bos_token".into(), self.bos_token.clone().into());
        ctx.insert("eos_token".into(), self.eos_token.clone().into());
        for (k, v) in extra {
            ctx.insert(k.clone(), v.clone());
        }
        let mut out = Capped(Vec::new());
        tmpl.render_captured_to(Value::from_serialize(&ctx), &mut out).map_err(|e| match e.kind() {
            // raise_exception's message, as transformers reports it.
            ErrorKind::InvalidOperation => EngineError::Template(e.detail().unwrap_or_default().to_string()),
            ErrorKind::OutOfFuel => EngineError::Template(format!(
                "the chat template ran past {TEMPLATE_FUEL} steps (a runaway loop?); it was stopped"
            )),
            ErrorKind::WriteFailure => EngineError::Template(format!(
                "the chat template's output passed {} MiB; it was stopped",
                TEMPLATE_OUTPUT_LIMIT >> 20
            )),
            _ => EngineError::Template(e.to_string()),
        })?;
        String::from_utf8(out.0)
            .map_err(|e| EngineError::Template(format!("the chat template's output is not UTF-8: {e}")))
    }
}

/// minijinja set up as transformers sets up jinja2 (`trim_blocks`, `lstrip_blocks`, loop
/// controls, Python string methods, its own `tojson`, `raise_exception`, `strftime_now`).
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |fmt: String| -> String { strftime_now(&fmt) });
    // A template comes with the model, so it is untrusted: it gets a budget of instructions
    // (a real one spends a few hundred per message) and its output is capped (see `render`).
    env.set_fuel(Some(TEMPLATE_FUEL));
    env
}

/// Instructions a template may run per render: far above any real template's needs (a few
/// hundred per message), far below a loop nest that would hold a worker for minutes.
pub const TEMPLATE_FUEL: u64 = 20_000_000;

/// The longest prompt text a template may produce: more than a 1M-token context holds.
pub const TEMPLATE_OUTPUT_LIMIT: usize = 32 << 20;

/// Collects a render's output, failing once it passes [`TEMPLATE_OUTPUT_LIMIT`].
struct Capped(Vec<u8>);

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > TEMPLATE_OUTPUT_LIMIT {
            return Err(std::io::Error::other("output limit"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Python's `json.dumps(x, ensure_ascii=False, indent=…)`: `", "`/`": "` separators, non-ASCII
/// kept, no HTML escaping.
fn tojson(value: Value, kwargs: Kwargs) -> Result<String, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    py_dump(&json, indent, 0, &mut out);
    Ok(out)
}

fn py_dump(v: &serde_json::Value, indent: Option<usize>, level: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                py_dump(item, indent, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push_str(": ");
                py_dump(item, indent, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// `datetime.now().strftime(fmt)` for the codes chat templates use, in UTC.
pub fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format_date(secs, fmt)
}

/// Formats a Unix time with `strftime` codes `%d %m %Y %y %B %b %A %a %H %M %S %j %%`.
pub fn format_date(unix_secs: u64, fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Thursday", "Friday", "Saturday", "Sunday", "Monday", "Tuesday", "Wednesday"];
    let days = (unix_secs / 86_400) as i64;
    let secs = unix_secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model's template is untrusted: a runaway loop and a flood of output are stopped with
    /// the reason, quickly, instead of holding a worker thread or its memory.
    #[test]
    fn runaway_templates_are_stopped() {
        let hi = [Message::new("user", "hi")];
        let cases = [
            (
                "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                "ran past 20000000 steps",
            ),
            ("{% for i in range(1000) %}{{ 'x' * 100000 }}{% endfor %}", "output passed 32 MiB"),
        ];
        for (source, want) in cases {
            let started = std::time::Instant::now();
            let t = ChatTemplate::new(source, "test", "<s>", "</s>").unwrap();
            let e = t.render(&hi, true, &Default::default()).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(started.elapsed() < std::time::Duration::from_secs(30), "{:?}", started.elapsed());
        }
    }

    #[test]
    fn dates_format_like_python() {
        // 2024-07-26 was a Friday.
        let t = 1_721_952_000 + 3 * 3600 + 4 * 60 + 5;
        assert_eq!(format_date(t, "%d %b %Y"), "26 Jul 2024");
        assert_eq!(format_date(t, "%A %B %d, %H:%M:%S %j %%"), "Friday July 26, 03:04:05 208 %");
        assert_eq!(format_date(951_782_400, "%Y-%m-%d"), "2000-02-29");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let env = environment();
        let render = |src: &str| {
            env.render_str(src, minijinja::context! { x => serde_json::json!({"a": [1, "é<b>"], "b": {"c": null}}) })
                .unwrap()
        };
        assert_eq!(render("{{ x | tojson }}"), r#"{"a": [1, "é<b>"], "b": {"c": null}}"#);
        assert_eq!(
            render("{{ x | tojson(indent=2) }}"),
            "{\n  \"a\": [\n    1,\n    \"é<b>\"\n  ],\n  \"b\": {\n    \"c\": null\n  }\n}"
        );
    }

    #[test]
    fn raise_exception_gives_its_message() {
        let t = ChatTemplate::new("{{ raise_exception('System role not supported') }}", "test", "", "").unwrap();
        let err = t.render(&[], false, &Default::default()).unwrap_err().to_string();
        assert_eq!(err, "chat template: System role not supported");
    }

    #[test]
    fn defaults_are_chosen_by_vocabulary() {
        let t = ChatTemplate::default_for(&|t| t == "<start_of_turn>", "<bos>", "<eos>").unwrap();
        assert_eq!(t.origin, "default:gemma");
        let out = t
            .render(&[Message::new("system", "Be brief."), Message::new("user", "Hi")], true, &Default::default())
            .unwrap();
        assert_eq!(out, "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n");
        let t = ChatTemplate::default_for(&|_| false, "", "").unwrap();
        assert_eq!(t.render(&[Message::new("user", "Hi")], true, &Default::default()).unwrap(), "User: Hi\nAssistant:");
    }
}
