//! Chat templates: the model's Jinja `chat_template`, rendered with minijinja configured the way
//! transformers configures jinja2, so prompts are byte-identical to `apply_chat_template`.
//! Models without a template get a documented default chosen by their vocabulary.

use minijinja::value::{Kwargs, Rest};
use minijinja::{Environment, Error, ErrorKind, State, Value};
use serde::{Deserialize, Serialize};

use std::sync::Mutex;

use crate::EngineError;
use crate::chat_child::ChildRenderer;
pub use crate::chat_child::{ChildLimits, TemplateIsolation};

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
    /// Where it came from: `model` or `default:<name>`.
    pub origin: String,
    renderer: Renderer,
}

/// Where a template renders (see [`TemplateIsolation`]).
#[derive(Debug)]
enum Renderer {
    Here { env: Box<Environment<'static>>, bos_token: String, eos_token: String },
    Child(Mutex<ChildRenderer>),
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
    /// Compiles a template to render in this process.
    pub fn new(source: &str, origin: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, EngineError> {
        let mut env = environment();
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| EngineError::Template(format!("the chat template does not compile: {e}")))?;
        let renderer = Renderer::Here { env: Box::new(env), bos_token: bos_token.into(), eos_token: eos_token.into() };
        Ok(ChatTemplate { origin: origin.to_string(), renderer })
    }

    /// Compiles a template where `isolation` says: in this process, or in a renderer child
    /// (started now, so that a template that does not compile is known at once).
    pub fn isolated(
        source: &str,
        origin: &str,
        bos_token: &str,
        eos_token: &str,
        isolation: &TemplateIsolation,
    ) -> Result<ChatTemplate, EngineError> {
        match isolation {
            TemplateIsolation::InProcess => ChatTemplate::new(source, origin, bos_token, eos_token),
            TemplateIsolation::Child(limits) => {
                let child = ChildRenderer::start(limits, source, origin, bos_token, eos_token)?;
                Ok(ChatTemplate { origin: origin.to_string(), renderer: Renderer::Child(Mutex::new(child)) })
            }
        }
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
        // Gantry's own defaults are trusted: they render in this process.
        ChatTemplate::new(source, &format!("default:{name}"), bos_token, eos_token)
    }

    /// Renders `messages`; `extra` adds template variables (e.g. `date_string`).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, EngineError> {
        let (env, bos_token, eos_token) = match &self.renderer {
            Renderer::Here { env, bos_token, eos_token } => (env, bos_token, eos_token),
            Renderer::Child(child) => {
                let mut child =
                    child.lock().map_err(|_| EngineError::Template("the renderer's lock is poisoned".into()))?;
                return child.render(messages, add_generation_prompt, extra);
            }
        };
        let tmpl = env.get_template(NAME).map_err(|e| EngineError::Template(e.to_string()))?;
        let mut ctx = serde_json::Map::new();
        ctx.insert(
            "messages".into(),
            serde_json::to_value(messages).map_err(|e| EngineError::Template(e.to_string()))?,
        );
        ctx.insert("tools".into(), serde_json::Value::Null);
        ctx.insert("documents".into(), serde_json::Value::Null);
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        ctx.insert("bos_token".into(), bos_token.clone().into());
        ctx.insert("eos_token".into(), eos_token.clone().into());
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
    env.set_unknown_method_callback(string_method);
    env.add_filter("tojson", tojson);
    add_bounded_filters(&mut env);
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

/// The widest `tojson` indent a template may ask for.
const MAX_JSON_INDENT: usize = 64;

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

/// The builtin filters whose result an argument sizes, each checked before it runs: one call
/// must not ask for more than a render may produce. (Found with inputs written for the fuzz
/// target: `indent(10**12)`, `batch(10**12)`, `'%1000000000000d' | format(1)`, a `join` or
/// `replace` with a long string asked for gigabytes to terabytes at once, and a failed
/// allocation aborts the worker. The fuzzer itself found `format` with a non-ASCII `%(key)`,
/// which panics inside minijinja, and a precision past 65535, which panics in Rust's
/// formatting.) The Python string methods that do the same work (`.format()`, `.replace()`,
/// `.join()`) are checked alike, in [`string_method`].
fn add_bounded_filters(env: &mut Environment<'static>) {
    use minijinja::filters;
    bounded(env, "indent", Value::from_function(filters::indent), |args| {
        let (positional, kwargs) = split_kwargs(args);
        let text = positional.first().map(to_text).unwrap_or_default();
        let width = positional.get(1).cloned().or_else(|| kwarg(kwargs, "width")).map_or(4, |w| int(&w));
        let lines = text.matches('\n').count() as u64 + 1;
        Ok((text.len() as u64).saturating_add(lines.saturating_mul(width)))
    });
    // Both set aside room for `count` values at once.
    let values = |args: &[Value]| Ok(args.get(1).map_or(0, int).saturating_mul(std::mem::size_of::<Value>() as u64));
    bounded(env, "slice", Value::from_function(filters::slice), values);
    bounded(env, "batch", Value::from_function(filters::batch), values);
    bounded(env, "join", Value::from_function(filters::join), |args| {
        let (positional, _) = split_kwargs(args);
        Ok(join_size(positional.first(), &positional.get(1).map(to_text).unwrap_or_default()))
    });
    bounded(env, "replace", Value::from_function(filters::replace), |args| {
        let [text, from, to] = [0, 1, 2].map(|i| args.get(i).map(to_text).unwrap_or_default());
        Ok(replace_size(&text, &from, &to))
    });
    bounded(env, "format", Value::from_function(filters::format), |args| {
        let (positional, _) = split_kwargs(args);
        let spec = positional.first().map(to_text).unwrap_or_default();
        format_size(FormatStyle::Printf, &spec, positional.get(1..).unwrap_or_default())
    });
}

/// Python's string methods (minijinja-contrib's `pycompat`, as transformers' jinja2 has them),
/// with `.format()`, `.replace()` and `.join()` checked as their filters are.
fn string_method(state: &State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    if let Some(text) = value.as_str() {
        let (positional, _) = split_kwargs(args);
        let size = match method {
            "format" => Some(format_size(FormatStyle::Str, text, positional)?),
            "replace" => {
                let [from, to] = [0, 1].map(|i| positional.get(i).map(to_text).unwrap_or_default());
                Some(replace_size(text, &from, &to))
            }
            "join" => Some(join_size(positional.first(), text)),
            _ => None,
        };
        if let Some(size) = size {
            within_output_limit(method, size)?;
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// Registers `builtin` as filter `name`, refused when `size` says its result could pass
/// [`TEMPLATE_OUTPUT_LIMIT`] (or refuses the arguments itself).
fn bounded(
    env: &mut Environment<'static>,
    name: &'static str,
    builtin: Value,
    size: fn(&[Value]) -> Result<u64, Error>,
) {
    env.add_filter(name, move |state: &State, args: Rest<Value>| -> Result<Value, Error> {
        within_output_limit(name, size(&args)?)?;
        builtin.call(state, &args)
    });
}

fn within_output_limit(name: &str, size: u64) -> Result<(), Error> {
    if size > TEMPLATE_OUTPUT_LIMIT as u64 {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "the chat template's `{name}` would make {size} bytes, more than a render may produce ({} MiB)",
                TEMPLATE_OUTPUT_LIMIT >> 20
            ),
        ));
    }
    Ok(())
}

/// Joining `items` with `joiner` between them.
fn join_size(items: Option<&Value>, joiner: &str) -> u64 {
    let (mut n, mut len) = (0u64, 0u64);
    for item in items.and_then(|v| v.try_iter().ok()).into_iter().flatten() {
        n += 1;
        len = len.saturating_add(to_text(&item).len() as u64);
    }
    len.saturating_add(n.saturating_sub(1).saturating_mul(joiner.len() as u64))
}

/// Replacing every `from` in `text` with `to` (an empty `from` matches between all characters).
fn replace_size(text: &str, from: &str, to: &str) -> u64 {
    let hits = if from.is_empty() { text.chars().count() + 1 } else { text.matches(from).count() };
    (text.len() as u64).saturating_add((hits as u64).saturating_mul(to.len() as u64))
}

/// The two format-string languages minijinja speaks: the `format` filter's printf style and
/// Python's `str.format()`.
#[derive(Clone, Copy)]
enum FormatStyle {
    Printf,
    Str,
}

/// The widest width or precision a format may ask for. minijinja hands a precision to Rust's
/// formatting, which panics past `u16::MAX` (found by fuzzing: `'%.70000e' | format(1.5)`);
/// real templates ask for a few characters.
const MAX_FORMAT_WIDTH: u64 = u16::MAX as u64;

/// What formatting `args` by `spec` can produce: the texts plus every width and precision. An
/// error, before minijinja sees it, for what would panic there: a width or precision past
/// [`MAX_FORMAT_WIDTH`], a printf mapping key that is not ASCII.
fn format_size(style: FormatStyle, spec: &str, args: &[Value]) -> Result<u64, Error> {
    let texts = args.iter().fold(spec.len() as u64, |n, a| n.saturating_add(to_text(a).len() as u64));
    let mut widths = match style {
        FormatStyle::Printf => printf_widths(spec)?,
        FormatStyle::Str => str_format_widths(spec),
    };
    // A printf `*` takes its width from the arguments (minijinja refuses it today; counted in
    // case it learns it).
    if matches!(style, FormatStyle::Printf) && spec.contains('*') {
        widths.extend(args.iter().map(int));
    }
    if let Some(n) = widths.iter().find(|&&n| n > MAX_FORMAT_WIDTH) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("the chat template's format asks for a width or precision of {n}; at most {MAX_FORMAT_WIDTH}"),
        ));
    }
    Ok(widths.iter().fold(texts, |n, w| n.saturating_add(*w)))
}

/// Every width and precision of a printf-style format (`%(key)-08.3f`).
fn printf_widths(spec: &str) -> Result<Vec<u64>, Error> {
    let mut widths = Vec::new();
    let mut rest = spec;
    while let Some(at) = rest.find('%') {
        let mut conversion = &rest[at + 1..];
        if let Some(after) = conversion.strip_prefix('%') {
            rest = after;
            continue;
        }
        if let Some(key) = conversion.strip_prefix('(') {
            let (name, after) = key.split_once(')').unwrap_or((key, ""));
            // Found by fuzzing: minijinja 2.24 panics on a non-ASCII mapping key (it steps
            // through the key a byte at a time), and the format string may be a message.
            if !name.is_ascii() {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("format's mapping key `{name}` is not ASCII"),
                ));
            }
            conversion = after;
        }
        widths.extend(numbers(conversion.trim_start_matches(|c: char| "-+ #0".contains(c))));
        rest = conversion;
    }
    Ok(widths)
}

/// Every width and precision of a `str.format()` string (`{0:*^+#08,.3f}`).
fn str_format_widths(spec: &str) -> Vec<u64> {
    let mut widths = Vec::new();
    let mut rest = spec;
    while let Some(at) = rest.find('{') {
        let field = &rest[at + 1..];
        if let Some(after) = field.strip_prefix('{') {
            rest = after;
            continue;
        }
        let (field, after) = field.split_once('}').unwrap_or((field, ""));
        if let Some((_, options)) = field.split_once(':') {
            // [[fill]align][sign][#][0]width[,|_][.precision][type]
            let mut chars = options.chars();
            let options = match (chars.next(), chars.next()) {
                (Some(fill), Some('<' | '>' | '^')) => &options[fill.len_utf8() + 1..],
                (Some('<' | '>' | '^'), _) => &options[1..],
                _ => options,
            };
            let options = options.trim_start_matches(['+', '-', ' ']).trim_start_matches('#').trim_start_matches('0');
            widths.extend(numbers(&options.replacen([',', '_'], "", 1)));
        }
        rest = after;
    }
    widths
}

/// The width and precision at the start of a conversion: `12.3f` gives 12 and 3 (a number too
/// long for u64 gives u64::MAX).
fn numbers(conversion: &str) -> Vec<u64> {
    let digits = conversion.split(|c: char| !c.is_ascii_digit() && c != '.').next().unwrap_or_default();
    digits.split('.').filter(|n| !n.is_empty()).map(|n| n.parse::<u64>().unwrap_or(u64::MAX)).collect()
}

/// A filter's positional arguments (the filtered value first) and its keyword arguments.
fn split_kwargs(args: &[Value]) -> (&[Value], Option<&Value>) {
    match args.split_last() {
        Some((last, positional)) if last.is_kwargs() => (positional, Some(last)),
        _ => (args, None),
    }
}

fn kwarg(kwargs: Option<&Value>, name: &str) -> Option<Value> {
    kwargs.and_then(|k| k.get_attr(name).ok()).filter(|v| !v.is_undefined() && !v.is_none())
}

/// An integer argument's size (0 for anything else: the filter itself refuses those).
fn int(v: &Value) -> u64 {
    v.as_i64().map_or(0, i64::unsigned_abs)
}

fn to_text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

/// Python's `json.dumps(x, ensure_ascii=False, indent=…)`: `", "`/`": "` separators, non-ASCII
/// kept, no HTML escaping.
fn tojson(value: Value, kwargs: Kwargs) -> Result<String, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    // Found while fuzzing: `tojson(indent=10**12)` asked for a terabyte of spaces. Real templates
    // indent by 2 or 4.
    if let Some(n) = indent.filter(|&n| n > MAX_JSON_INDENT) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson's indent {n} is more than {MAX_JSON_INDENT}"),
        ));
    }
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
    fn a_backwards_slice_that_starts_before_its_stop_is_empty_as_in_python() {
        // Fuzz finding 9: minijinja computed the slice's length with a subtraction that
        // underflows here; builds with overflow checks panicked.
        let t = ChatTemplate::new("[{{ messages[0]['content'][0:2:-1] }}|{{ 'abcd'[3:1:-1] }}]", "test", "<s>", "</s>")
            .unwrap();
        assert_eq!(t.render(&[Message::new("user", "abc")], false, &Default::default()).unwrap(), "[|dc]");
    }

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

    /// Found with inputs written for the fuzz target: a filter whose argument sizes its result
    /// (`indent`, `slice`, `batch`, `join`, `replace`, `format`, `tojson`'s indent) asked for
    /// terabytes in one call and the failed allocation aborted the process. Now such a call is
    /// refused; ordinary ones work.
    #[test]
    fn filters_cannot_ask_for_terabytes() {
        let hi = [Message::new("user", "hi")];
        let render = |source: &str| {
            let t = ChatTemplate::new(source, "test", "<s>", "</s>").unwrap();
            t.render(&hi, false, &Default::default()).map_err(|e| e.to_string())
        };
        for source in [
            "{{ 'a\nb' | indent(1000000000000) }}",
            "{{ 'a\nb' | indent(width=1000000000000) }}",
            "{{ ('\n' * 10000000) | indent(100) }}",
            "{{ [1] | slice(1000000000000) | list }}",
            "{{ [1] | batch(1000000000000) | list }}",
            "{{ range(100000) | join('x' * 10000000) }}",
            "{{ ('x' * 10000000) | replace('x', 'yyyyyyyy') }}",
            "{{ 'ab' | replace('', 'x' * 100000000) }}",
            "{{ '%s' | format('x' * 40000000) }}",
            // The Python string methods that do the same work.
            "{{ ('x' * 10000000).replace('x', 'yyyyyyyy') }}",
            "{{ 'ab'.replace('', 'x' * 100000000) }}",
            "{{ ('x' * 1000000).join(range(100)) }}",
            "{{ '{}'.format('x' * 40000000) }}",
        ] {
            let e = render(source).unwrap_err();
            assert!(e.contains("more than a render may produce"), "{source}: {e}");
        }
        assert!(render("{{ [[1]] | tojson(indent=1000000000000) }}").unwrap_err().contains("more than 64"));
        // What real templates do still works, as the builtins do it.
        let ok = "{{ 'a\nb' | indent(2) }}|{{ 'a\nb' | indent(width=3, first=true) }}|{{ [1, 2, 3] | slice(2) | list }}|\
                  {{ [1, 2, 3] | batch(2) | list }}|{{ ['a', 'b'] | join(', ') }}|{{ 'abc' | replace('b', 'x') }}|\
                  {{ '%5d|%-4s|%.2f' | format(3, 'ab', 1.234) }}|{{ [1] | tojson(indent=2) }}";
        assert_eq!(
            render(ok).unwrap(),
            "a\n  b|   a\n   b|[[1, 2], [3]]|[[1, 2], [3]]|a, b|axc|    3|ab  |1.23|[\n  1\n]"
        );
        let ok = "{{ 'abc'.replace('b', 'x') }}|{{ ', '.join(['a', 'b']) }}|{{ '{:>5}|{:.2f}|{:,}'.format('ab', 1.234, 1234567) }}";
        assert_eq!(render(ok).unwrap(), "axc|a, b|   ab|1.23|1,234,567");
    }

    /// Found by fuzzing: a precision past 65535 (`'%.70000e' | format(1.5)`) panicked in
    /// Rust's formatting, which minijinja's `format` hands the precision to; a template may
    /// format a message's text, and `str.format()` does the same. Widths and precisions are
    /// now at most 65535, for both, which also keeps one field from asking for terabytes.
    #[test]
    fn format_widths_past_what_rust_formats_are_an_error_not_a_panic() {
        let render = |source: &str, content: &str| {
            let t = ChatTemplate::new(source, "test", "<s>", "</s>").unwrap();
            t.render(&[Message::new("user", content)], false, &Default::default()).map_err(|e| e.to_string())
        };
        for (source, n) in [
            ("{{ '%.70000e' | format(1.5) }}", "70000"),
            ("{{ '%.70000f' | format(1.5) }}", "70000"),
            ("{{ '%#.70000g' | format(1.5) }}", "70000"),
            ("{{ '%70000d' | format(1) }}", "70000"),
            ("{{ '%(a)-070000.2f' | format(a=1.5) }}", "70000"),
            ("{{ '%1000000000000d' | format(1) }}", "1000000000000"),
            ("{{ '%.99999999999999999999f' | format(1.5) }}", "18446744073709551615"),
            ("{{ '%(a)1000000000000s' | format(a=1) }}", "1000000000000"),
            ("{{ '%*d' | format(1000000000000, 1) }}", "1000000000000"),
            ("{{ '{:.70000e}'.format(1.5) }}", "70000"),
            ("{{ '{0:*^+#070000,.2f}'.format(1.5) }}", "70000"),
            ("{{ '{:.2f} {:>70000}'.format(1.5, 'x') }}", "70000"),
            ("{{ '{{ {:1000000000000}'.format(1) }}", "1000000000000"),
        ] {
            let e = render(source, "hi").unwrap_err();
            assert_eq!(
                e,
                format!(
                    "chat template: the chat template's format asks for a width or precision of {n}; at most 65535"
                ),
                "{source}"
            );
        }
        // From a message, through a template that formats the message's text.
        let e = render("{{ messages[0]['content'] | format(2) }}", "%.70000g").unwrap_err();
        assert_eq!(
            e,
            "chat template: the chat template's format asks for a width or precision of 70000; at most 65535"
        );
        // 65535 itself formats, in both styles; `{{` and `%%` are not fields.
        assert_eq!(render("{{ ('%.65535f' | format(1.5)) | length }}", "").unwrap(), "65537");
        assert_eq!(render("{{ ('{:.65535f}'.format(1.5)) | length }}", "").unwrap(), "65537");
        assert_eq!(
            render("{{ '%%70000d %d' | format(1) }}|{{ '{{:70000}} {}'.format(1) }}", "").unwrap(),
            "%70000d 1|{:70000} 1"
        );
    }

    /// Found by fuzzing: minijinja's `format` panicked on a mapping key with a non-ASCII
    /// character (`'%(é)s'`), and a template may format a message's text. Now it is an error.
    #[test]
    fn format_with_a_non_ascii_key_is_an_error_not_a_panic() {
        let t = ChatTemplate::new("{{ messages[0]['content'] | format(a=1) }}", "test", "<s>", "</s>").unwrap();
        for content in ["%(\u{e9})s", "x %(caf\u{e9}", "true %(}\n pla\u{ee}t"] {
            let e = t.render(&[Message::new("user", content)], false, &Default::default()).unwrap_err().to_string();
            assert!(e.contains("is not ASCII"), "{content}: {e}");
        }
        // ASCII keys, an escaped `%%(` and non-ASCII text outside keys still format.
        let t = ChatTemplate::new("{{ '%%(\u{e9}) \u{e9} %(a)s' | format(a=1) }}", "test", "<s>", "</s>").unwrap();
        assert_eq!(t.render(&[], false, &Default::default()).unwrap(), "%(\u{e9}) \u{e9} 1");
        let t = ChatTemplate::new("{{ '%(a)s and %(b)5s' | format(a=1, b='x') }}", "test", "<s>", "</s>").unwrap();
        assert_eq!(t.render(&[], false, &Default::default()).unwrap(), "1 and     x");
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
