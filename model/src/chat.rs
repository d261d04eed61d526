//! Chat templates: the Jinja template a model ships (`tokenizer_config.json`'s
//! `chat_template` or GGUF's `tokenizer.chat_template`), rendered with `minijinja` and its
//! Python-compatibility methods (`.strip()`, `.startswith()`, ...) that real templates use.

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with the given role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`.
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        // Templates that print today's date (Llama 3.1) get a fixed, reproducible one.
        env.add_function("strftime_now", |_fmt: String| -> String {
            "26 Jul 2024".to_string()
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::ChatTemplate(e.to_string()))?;
        Ok(ChatTemplate { env })
    }

    /// The token ids of a conversation with the assistant's turn opened: rendered with the
    /// tokenizer's BOS/EOS text, then tokenized without adding special tokens (a template
    /// writes BOS itself when the model wants one).
    pub fn encode(&self, tokenizer: &Tokenizer, messages: &[Message]) -> Result<Vec<u32>> {
        let rendered = self.render(
            messages,
            true,
            &tokenizer.token_text(tokenizer.bos()),
            &tokenizer.token_text(tokenizer.eos().first().copied()),
        )?;
        tokenizer.encode(&rendered, false)
    }

    /// Renders a conversation; `add_generation_prompt` opens the assistant's turn.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::ChatTemplate(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        })
        .map_err(|e| Error::ChatTemplate(e.to_string()))
    }
}

/// ChatML, used by our synthetic and demo models.
pub const CHATML_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_turns_and_generation_prompt() {
        let t = ChatTemplate::new(CHATML_TEMPLATE).unwrap();
        let out = t
            .render(
                &[
                    Message::new("system", "Be brief."),
                    Message::new("user", " Hi "),
                ],
                true,
                "<s>",
                "</s>",
            )
            .unwrap();
        assert_eq!(
            out,
            "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}{{ messages[0]['content'].strip().upper() }}";
        let t = ChatTemplate::new(src).unwrap();
        assert_eq!(
            t.render(&[Message::new("user", " hi ")], false, "", "")
                .unwrap(),
            "HI"
        );
        let err = t
            .render(&[Message::new("system", "x")], false, "", "")
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("first message must be from the user"),
            "{err}"
        );
    }

    #[test]
    fn a_broken_template_is_a_clear_error() {
        let err = ChatTemplate::new("{% for m in messages %}").unwrap_err();
        assert!(err.to_string().starts_with("chat template:"), "{err}");
    }
}
