//! Prompt -> token ids, in process, as vLLM's OpenAI server computes them: the model's
//! `tokenizer.json` (the same Rust library HF's fast tokenizers run) and its chat template
//! rendered the way `transformers.apply_chat_template` renders it (Jinja with `trim_blocks`,
//! `lstrip_blocks`, Python's string methods, `tojson` as Python's `json.dumps`), with messages
//! normalized as vLLM normalizes them.

use super::openai::{ChatInput, PromptInput};
use minijinja::{Environment, Error, ErrorKind, Value as Jv};
use serde_json::{Map, Value};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};
use tokenizers::Tokenizer;

/// A model's tokenizer and chat template.
pub struct ModelTokenizer {
    tokenizer: Tokenizer,
    /// The chat template, compiled once (or why it does not compile).
    template: Option<Result<Environment<'static>, String>>,
    /// The template iterates over message content parts (vLLM's "openai" content format):
    /// content is then given as a list of parts, else as one string.
    parts: bool,
    special: Map<String, Value>,
}

/// Why a prompt has no tokens (the request is then routed by load alone).
#[derive(Debug)]
pub struct Unkeyable(pub String);

fn special_token(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl ModelTokenizer {
    /// Loads `tokenizer.json`, and `tokenizer_config.json` and `chat_template.jinja` if present,
    /// from a model directory.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join("tokenizer.json").display()))?;
        let config: Map<String, Value> = match std::fs::read(dir.join("tokenizer_config.json")) {
            Ok(b) => serde_json::from_slice(&b)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Map::new(),
            Err(e) => return Err(e.into()),
        };
        let template = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(t) => Some(t),
            Err(_) => match config.get("chat_template") {
                Some(Value::String(t)) => Some(t.clone()),
                // Named templates: the "default" one.
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
                _ => None,
            },
        };
        let mut special = Map::new();
        for key in ["bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"] {
            if let Some(t) = config.get(key).and_then(special_token) {
                special.insert(key.into(), Value::String(t));
            }
        }
        let tokenizer = Self { tokenizer, template: None, parts: false, special };
        Ok(match template {
            Some(t) => tokenizer.with_template(t),
            None => tokenizer,
        })
    }

    /// The same tokenizer with `template` as its chat template (as vLLM's `--chat-template`).
    /// A template that does not compile leaves chat requests unkeyed (logged once here).
    pub fn with_template(mut self, template: String) -> Self {
        self.parts = iterates_content(&template);
        let env = environment(template).map_err(|e| format!("{e:#}"));
        if let Err(e) = &env {
            tracing::warn!("chat template does not compile ({e}): chat requests are routed by load alone");
        }
        self.template = Some(env);
        self
    }

    /// The token ids vLLM computes for `prompt`.
    pub fn tokens(&self, prompt: &PromptInput) -> Result<Vec<u32>, Unkeyable> {
        match prompt {
            PromptInput::Tokens(t) => Ok(t.clone()),
            PromptInput::Text { text, add_special_tokens } => self.encode(text, *add_special_tokens),
            PromptInput::Chat(chat) => {
                let text = self.render(chat)?;
                self.encode(&text, chat.add_special_tokens)
            }
        }
    }

    /// Encodes text with the model's tokenizer.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, Unkeyable> {
        let enc = self.tokenizer.encode(text, add_special_tokens).map_err(|e| Unkeyable(format!("tokenizer: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The conversation rendered with the chat template, as `apply_chat_template(tokenize=False)`.
    pub fn render(&self, chat: &ChatInput) -> Result<String, Unkeyable> {
        if chat.template.is_some() {
            return Err(Unkeyable("the request brings its own chat_template".into()));
        }
        let template = match &self.template {
            None => return Err(Unkeyable("the model has no chat template".into())),
            Some(Err(e)) => return Err(Unkeyable(format!("chat template: {e}"))),
            Some(Ok(env)) => env.get_template("chat").map_err(|e| Unkeyable(format!("chat template: {e:#}")))?,
        };
        let messages = chat.messages.iter().map(|m| self.message(m)).collect::<Result<Vec<_>, _>>()?;
        let mut ctx = self.special.clone();
        for (k, v) in &chat.template_kwargs {
            ctx.insert(k.clone(), v.clone());
        }
        ctx.insert("messages".into(), Value::Array(messages.clone()));
        ctx.insert("add_generation_prompt".into(), Value::Bool(chat.add_generation_prompt));
        if let Some(tools) = &chat.tools {
            ctx.insert("tools".into(), tools.clone());
        }
        if let Some(documents) = &chat.documents {
            ctx.insert("documents".into(), documents.clone());
        }
        let rendered = template
            .render(Jv::from(minijinja::value::Serde(Value::Object(ctx))))
            .map_err(|e| Unkeyable(format!("chat template: {e:#}")))?;
        if !chat.continue_final_message {
            return Ok(rendered);
        }
        // As transformers: cut the rendering after the final message's content.
        let last = messages.last().and_then(|m| m.get("content")).map(final_text).unwrap_or_default();
        let last = last.trim();
        match rendered.rfind(last) {
            Some(at) if !last.is_empty() => Ok(rendered[..at + last.len()].to_string()),
            _ => Err(Unkeyable("continue_final_message: the final message is not in the rendering".into())),
        }
    }

    /// One message as vLLM hands it to the template: text parts joined by newlines (or kept as
    /// a list of text parts for templates that iterate over them); other parts (images,
    /// audio) make the prompt unkeyable.
    fn message(&self, m: &Value) -> Result<Value, Unkeyable> {
        let Value::Object(m) = m else { return Err(Unkeyable("a message is not an object".into())) };
        let mut out = m.clone();
        let texts: Vec<String> = match m.get("content") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(parts)) => parts
                .iter()
                .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text") | None, Some(t)) => Ok(t.to_string()),
                    _ => Err(Unkeyable("a message has non-text content".into())),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(Unkeyable("message content is neither text nor parts".into())),
        };
        let content = match self.parts {
            true => Value::Array(texts.into_iter().map(|t| serde_json::json!({"type": "text", "text": t})).collect()),
            false => Value::String(texts.join("\n")),
        };
        out.insert("content".into(), content);
        Ok(Value::Object(out))
    }
}

fn final_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => {
            parts.last().and_then(|p| p.get("text")).and_then(Value::as_str).unwrap_or_default().to_string()
        }
        _ => String::new(),
    }
}

/// Whether a template loops over message content parts (vLLM detects the same to choose the
/// "openai" content format).
fn iterates_content(template: &str) -> bool {
    let t: String = template.chars().filter(|c| !c.is_whitespace()).collect();
    ["in message['content']", "in message[\"content\"]", "in message.content", "inmessage['content']"]
        .iter()
        .any(|p| t.contains(&p.replace(' ', "")))
}

/// Renders a chat template over `ctx` with the Jinja settings transformers uses.
pub fn render(template: &str, ctx: &Value) -> Result<String, Error> {
    environment(template.to_string())?.get_template("chat")?.render(Jv::from(minijinja::value::Serde(ctx)))
}

/// An environment holding `template` as "chat", with the Jinja settings and helpers
/// transformers gives chat templates.
fn environment(template: String) -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build()?;
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<Jv, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |format: String| strftime(&format, SystemTime::now()));
    env.add_filter("tojson", tojson);
    env.add_template_owned("chat", template)?;
    Ok(env)
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)` as transformers' `tojson`.
fn tojson(value: Jv, kwargs: minijinja::value::Kwargs) -> Result<Jv, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| Error::new(ErrorKind::BadSerialization, e.to_string()))?;
    let mut out = String::new();
    python_json(&json, indent, 0, &mut out);
    Ok(Jv::from_safe_string(out))
}

fn python_json(v: &Value, indent: Option<usize>, depth: usize, out: &mut String) {
    let (item_sep, newline) = match indent {
        Some(n) => (",", Some(n)),
        None => (", ", None),
    };
    let open = |out: &mut String, d: usize| {
        if let Some(n) = newline {
            out.push('\n');
            out.push_str(&" ".repeat(n * d));
        }
    };
    match v {
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                open(out, depth + 1);
                python_json(x, indent, depth + 1, out);
            }
            open(out, depth);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, x)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                open(out, depth + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                python_json(x, indent, depth + 1, out);
            }
            open(out, depth);
            out.push('}');
        }
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or_default();
            out.push_str(&if f.fract() == 0.0 && f.abs() < 1e16 { format!("{f:.1}") } else { f.to_string() });
        }
        other => out.push_str(&other.to_string()),
    }
}

/// `strftime` for the fields chat templates use (`%Y %m %d %B %b %H %M %S %%`), in UTC.
fn strftime(format: &str, now: SystemTime) -> String {
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
    let secs = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
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
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
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
    use serde_json::json;
    use std::time::Duration;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_renders_as_transformers_does() {
        let ctx = json!({"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": true});
        assert_eq!(render(CHATML, &ctx).unwrap(), "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn trim_and_lstrip_blocks_and_python_methods() {
        // Jinja2 (trim_blocks, lstrip_blocks) renders this "AB".
        let t = "{% for m in messages %}\n    {% if true %}{{ m.content.strip() | upper }}{% endif %}\n{% endfor %}";
        let ctx = json!({"messages": [{"content": " a "}, {"content": "b"}]});
        assert_eq!(render(t, &ctx).unwrap(), "AB");
        let e = render("{{ raise_exception('no system role') }}", &json!({})).unwrap_err();
        assert!(format!("{e:#}").contains("no system role"));
    }

    #[test]
    fn tojson_is_pythons_json_dumps() {
        let ctx = json!({"x": {"name": "f", "args": [1, 2.0, "é"], "empty": {}}});
        assert_eq!(render("{{ x | tojson }}", &ctx).unwrap(), r#"{"name": "f", "args": [1, 2.0, "é"], "empty": {}}"#);
        assert_eq!(render("{{ [1] | tojson(indent=2) }}", &ctx).unwrap(), "[\n  1\n]");
    }

    #[test]
    fn strftime_formats_a_known_day() {
        let t = UNIX_EPOCH + Duration::from_secs(1_780_000_000); // 2026-05-28 20:26:40 UTC
        assert_eq!(strftime("%d %b %Y %H:%M:%S %B %%", t), "28 May 2026 20:26:40 May %");
    }

    #[test]
    fn content_format_follows_the_template() {
        assert!(iterates_content("{% for part in message['content'] %}"));
        assert!(iterates_content("{%- for c in message.content -%}"));
        assert!(!iterates_content(CHATML));
    }
}
