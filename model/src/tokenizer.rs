//! Text to token ids and back: `tokenizer.json` through the `tokenizers` crate, or the
//! tokenizer embedded in GGUF metadata (`tokenizer.ggml.*`), so one `.gguf` file is enough.
//!
//! GGUF tokenizers are rebuilt as a `tokenizer.json` document that `tokenizers` loads, the
//! same way transformers converts them: byte-level BPE (`gpt2` model: Llama 3, Qwen) with
//! the pre-tokenizer regex named by `tokenizer.ggml.pre`, and SentencePiece BPE (`llama`
//! model: Llama 2, Mistral) with merges recovered from the token scores and byte fallback.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};

use crate::error::{Error, Result};
use crate::format::{Format, ModelFile};
use crate::pretokenizers::{PreTokenizer, PRE_TOKENIZERS};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;
const TOKEN_TYPE_BYTE: i32 = 6;

/// A model's tokenizer with its special tokens and chat template.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Vec<u32>,
    chat_template: Option<String>,
}

impl Tokenizer {
    /// The tokenizer that comes with a model: `tokenizer.json` (and `tokenizer_config.json`)
    /// beside safetensors, or the one embedded in a GGUF file.
    pub fn for_model(file: &ModelFile) -> Result<Self> {
        let config = file.config();
        match file.format() {
            Format::Gguf => {
                let mut t = Self::from_gguf(file.gguf_metadata())?;
                if t.eos.is_empty() {
                    t.eos = config.eos_token_ids.clone();
                }
                Ok(t)
            }
            Format::Safetensors => {
                let dir = file.path().parent().unwrap_or(Path::new("."));
                let dir = if file.path().is_dir() {
                    file.path()
                } else {
                    dir
                };
                let mut t = Self::from_dir(dir)?;
                t.bos = t.bos.or(config.bos_token_id);
                for &e in &config.eos_token_ids {
                    if !t.eos.contains(&e) {
                        t.eos.push(e);
                    }
                }
                Ok(t)
            }
        }
    }

    /// Reads `tokenizer.json` and, if present, `tokenizer_config.json` from a directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let mut t = Tokenizer {
            inner,
            bos: None,
            eos: Vec::new(),
            chat_template: None,
        };
        let config_path = dir.join("tokenizer_config.json");
        if let Ok(text) = std::fs::read_to_string(&config_path) {
            let cfg: Json = serde_json::from_str(&text).map_err(|e| Error::Malformed {
                path: config_path.clone(),
                format: "tokenizer_config.json",
                reason: e.to_string(),
            })?;
            // Tokens may be given as strings or as `{"content": ...}` objects.
            let token_text = |key: &str| -> Option<String> {
                match cfg.get(key)? {
                    Json::String(s) => Some(s.clone()),
                    Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
                    _ => None,
                }
            };
            t.bos = token_text("bos_token").and_then(|s| t.inner.token_to_id(&s));
            if let Some(eos) = token_text("eos_token").and_then(|s| t.inner.token_to_id(&s)) {
                t.eos.push(eos);
            }
            t.chat_template = match cfg.get("chat_template") {
                Some(Json::String(s)) => Some(s.clone()),
                // A list of named templates: take the default one.
                Some(Json::Array(items)) => items
                    .iter()
                    .find(|i| i.get("name").and_then(Json::as_str) == Some("default"))
                    .and_then(|i| i.get("template").and_then(Json::as_str))
                    .map(str::to_string),
                _ => None,
            };
        }
        if t.chat_template.is_none() {
            let jinja = dir.join("chat_template.jinja");
            if let Ok(text) = std::fs::read_to_string(&jinja) {
                t.chat_template = Some(text);
            }
        }
        Ok(t)
    }

    /// Rebuilds the tokenizer stored in GGUF metadata.
    pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Self> {
        let missing = |k: &str| {
            Error::Tokenizer(format!(
                "GGUF file has no `{k}`: it carries no tokenizer; pass a tokenizer.json"
            ))
        };
        let model = md
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| missing("tokenizer.ggml.model"))?;
        let tokens: Vec<String> = string_array(md, "tokenizer.ggml.tokens")?
            .ok_or_else(|| missing("tokenizer.ggml.tokens"))?;
        let types: Vec<i32> = md
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.iter().map(|x| x.to_i32().unwrap_or(1)).collect())
            .unwrap_or_else(|| vec![1; tokens.len()]);
        let id_key = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let bos = id_key("tokenizer.ggml.bos_token_id");
        // Llama 3.x ends turns with <|eot_id|> / <|eom_id|>, stored beside the EOS id.
        let mut eos: Vec<u32> = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(id) = id_key(key).filter(|id| !eos.contains(id)) {
                eos.push(id);
            }
        }
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(model == "llama");
        // Control tokens are special (skipped when decoding for people); user-defined ones
        // (Qwen's <think>, <tool_call>) are whole tokens but part of the text.
        let specials: Vec<(u32, String, bool)> = tokens
            .iter()
            .enumerate()
            .filter_map(|(i, t)| match types.get(i).copied() {
                Some(TOKEN_TYPE_CONTROL) => Some((i as u32, t.clone(), true)),
                Some(TOKEN_TYPE_USER_DEFINED) => Some((i as u32, t.clone(), false)),
                _ => None,
            })
            .collect();
        let bos_text = if add_bos {
            bos.and_then(|b| tokens.get(b as usize).cloned())
        } else {
            None
        };
        let doc = match model.as_str() {
            "gpt2" => {
                let merges = string_array(md, "tokenizer.ggml.merges")?
                    .ok_or_else(|| missing("tokenizer.ggml.merges"))?;
                let pre = md
                    .get("tokenizer.ggml.pre")
                    .and_then(|v| v.to_string().ok())
                    .map(String::as_str)
                    .unwrap_or("default");
                let style = ByteLevelStyle::named(pre).ok_or_else(|| {
                    Error::Tokenizer(format!(
                        "GGUF pre-tokenizer `{pre}` is not one Strata knows (it knows llama.cpp's \
                         byte-level ones: llama3, qwen2, smollm, gpt-4o, deepseek-llm, …); \
                         convert the model with a llama.cpp of the same era, or report it"
                    ))
                })?;
                byte_level_bpe_json(&tokens, &merges, &specials, style, bos_text.as_deref())
            }
            "llama" => {
                let scores: Vec<f32> = md
                    .get("tokenizer.ggml.scores")
                    .and_then(|v| v.to_vec().ok())
                    .map(|v| v.iter().map(|x| x.to_f32().unwrap_or(0.0)).collect())
                    .unwrap_or_else(|| vec![0.0; tokens.len()]);
                sentencepiece_bpe_json(&tokens, &scores, &types, &specials, bos_text.as_deref())
            }
            other => {
                return Err(Error::Tokenizer(format!(
                    "GGUF tokenizer model `{other}` is not supported (supported: gpt2, llama)"
                )))
            }
        };
        let inner = tokenizers::Tokenizer::from_bytes(doc.to_string().as_bytes())
            .map_err(|e| Error::Tokenizer(format!("rebuilding the GGUF tokenizer: {e}")))?;
        let chat_template = md
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        Ok(Tokenizer {
            inner,
            bos,
            eos,
            chat_template,
        })
    }

    /// Token ids of `text`; `add_special` adds what the tokenizer adds around a prompt
    /// (usually BOS).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens are left out when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The text of one token as the vocabulary stores it.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Beginning-of-sequence id.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence ids.
    pub fn eos(&self) -> &[u32] {
        &self.eos
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Text of a token id, for a template's `bos_token`/`eos_token`.
    pub fn token_text(&self, id: Option<u32>) -> String {
        id.and_then(|i| self.inner.id_to_token(i))
            .unwrap_or_default()
    }
}

/// Turns a growing list of token ids into text pieces as they become printable, holding
/// back bytes of an unfinished UTF-8 character. Only a short window of recent ids is
/// re-decoded per token (as transformers' streamer does), so a long answer costs linear
/// time, and tokenizers whose pieces depend on their left neighbour still decode right.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Start of the window re-decoded for context.
    prefix: usize,
    /// End of what has been printed.
    read: usize,
}

impl StreamDecoder {
    /// A decoder with nothing seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token and returns the newly printable text (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let printed = tokenizer.decode(&self.ids[self.prefix..self.read], true)?;
        let text = tokenizer.decode(&self.ids[self.prefix..], true)?;
        if text.len() > printed.len()
            && text.is_char_boundary(printed.len())
            && !text.ends_with('\u{FFFD}')
        {
            let piece = text[printed.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            return Ok(piece);
        }
        Ok(String::new())
    }

    /// Whatever is still held back at the end of generation (an incomplete character is
    /// printed as U+FFFD).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        let printed = tokenizer.decode(&self.ids[self.prefix..self.read], true)?;
        let text = tokenizer.decode(&self.ids[self.prefix..], true)?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(text.get(printed.len()..).unwrap_or_default().to_string())
    }
}

fn string_array(md: &HashMap<String, Value>, key: &str) -> Result<Option<Vec<String>>> {
    let Some(v) = md.get(key) else {
        return Ok(None);
    };
    let items = v
        .to_vec()
        .map_err(|_| Error::Tokenizer(format!("`{key}` is not an array")))?;
    items
        .iter()
        .map(|x| {
            x.to_string()
                .cloned()
                .map_err(|_| Error::Tokenizer(format!("`{key}` holds a non-string")))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn added_tokens_json(specials: &[(u32, String, bool)]) -> Json {
    Json::Array(
        specials
            .iter()
            .map(|(id, content, special)| {
                json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": special})
            })
            .collect(),
    )
}

fn bos_post_processor(bos: Option<&str>, bos_id: Option<u32>) -> Json {
    match (bos, bos_id) {
        (Some(b), Some(id)) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b: {"id": b, "ids": [id], "tokens": [b]}}
        }),
        _ => Json::Null,
    }
}

/// How a byte-level BPE vocabulary splits text before merging: one of llama.cpp's named
/// pre-tokenizers, and whether text is NFC-normalised first (transformers does for Qwen2).
#[derive(Clone, Copy)]
pub(crate) struct ByteLevelStyle {
    pre: &'static PreTokenizer,
    nfc: bool,
}

impl ByteLevelStyle {
    /// The pre-tokenizer llama.cpp calls `name` (`tokenizer.ggml.pre`).
    pub(crate) fn named(name: &str) -> Option<Self> {
        let pre = PRE_TOKENIZERS.iter().find(|p| p.names.contains(&name))?;
        Some(ByteLevelStyle {
            pre,
            nfc: pre.names.contains(&"qwen2"),
        })
    }
}

/// A `tokenizer.json` document for byte-level BPE, as transformers writes one for each
/// family. `bos` names a token added in front of every encoded prompt.
pub(crate) fn byte_level_bpe_json(
    tokens: &[String],
    merges: &[String],
    specials: &[(u32, String, bool)],
    style: ByteLevelStyle,
    bos: Option<&str>,
) -> Json {
    let normalizer = if style.nfc {
        json!({"type": "NFC"})
    } else {
        Json::Null
    };
    let vocab: serde_json::Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    // Each split cuts every piece the one before left, keeping matches and what lies
    // between them, as llama.cpp applies its list; then bytes become GPT-2's characters.
    let mut steps: Vec<Json> = style
        .pre
        .splits
        .iter()
        .map(|p| json!({"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": false}))
        .collect();
    steps.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}));
    let pre_tokenizer = json!({"type": "Sequence", "pretokenizers": steps});
    let bos_id = bos
        .and_then(|b| tokens.iter().position(|t| t == b))
        .map(|i| i as u32);
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens_json(specials),
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": bos_post_processor(bos, bos_id),
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": style.pre.ignore_merges, "vocab": vocab, "merges": merges}
    })
}

/// A `tokenizer.json` for a SentencePiece BPE vocabulary (Llama 2, Mistral), as
/// transformers converts one: `▁` for spaces, byte fallback, and merges ordered by the
/// merged piece's score.
fn sentencepiece_bpe_json(
    tokens: &[String],
    scores: &[f32],
    types: &[i32],
    specials: &[(u32, String, bool)],
    bos: Option<&str>,
) -> Json {
    let index: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f32, usize, String)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        let ty = types.get(id).copied().unwrap_or(1);
        if ty == TOKEN_TYPE_BYTE || ty == TOKEN_TYPE_CONTROL || piece.chars().count() < 2 {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if let (Some(&l), Some(&r)) = (index.get(left), index.get(right)) {
                merges.push((
                    scores.get(id).copied().unwrap_or(0.0),
                    l.max(r),
                    format!("{left} {right}"),
                ));
            }
        }
    }
    // Higher score merges first; among equals, the pair of earlier pieces first.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let merges: Vec<String> = merges.into_iter().map(|m| m.2).collect();
    let vocab: serde_json::Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let unk = tokens
        .iter()
        .position(|t| t == "<unk>")
        .map(|i| tokens[i].clone());
    let bos_id = bos.and_then(|b| index.get(b)).map(|&i| i as u32);
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens_json(specials),
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
        ]},
        "pre_tokenizer": null,
        "post_processor": bos_post_processor(bos, bos_id),
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                  "ignore_merges": false, "vocab": vocab, "merges": merges}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spm_metadata() -> HashMap<String, Value> {
        // A toy SentencePiece vocabulary: specials, 256 byte pieces, then pieces by score.
        let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL];
        let mut scores = vec![0.0f32, 0.0, 0.0];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(TOKEN_TYPE_BYTE);
            scores.push(0.0);
        }
        for (i, piece) in [
            "▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "▁he", "llo", "▁hello", "▁w", "or",
            "▁wor", "ld", "▁world",
        ]
        .iter()
        .enumerate()
        {
            tokens.push(piece.to_string());
            types.push(1);
            scores.push(-(i as f32));
        }
        let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
        HashMap::from([
            (
                "tokenizer.ggml.model".to_string(),
                Value::String("llama".into()),
            ),
            ("tokenizer.ggml.tokens".to_string(), strings(tokens)),
            (
                "tokenizer.ggml.scores".to_string(),
                Value::Array(scores.into_iter().map(Value::F32).collect()),
            ),
            (
                "tokenizer.ggml.token_type".to_string(),
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
            ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(2)),
        ])
    }

    #[test]
    fn sentencepiece_gguf_vocab_encodes_whole_words_and_falls_back_to_bytes() {
        let t = Tokenizer::from_gguf(&spm_metadata()).unwrap();
        let ids = t.encode("hello world", true).unwrap();
        let pieces: Vec<String> = ids.iter().map(|&i| t.id_to_token(i).unwrap()).collect();
        assert_eq!(pieces, vec!["<s>", "▁hello", "▁world"]);
        assert_eq!(t.decode(&ids, true).unwrap(), "hello world");
        // `é` is not in the vocabulary: two byte pieces, decoded back to the character.
        let ids = t.encode("hé", false).unwrap();
        assert!(ids.iter().any(|&i| t.id_to_token(i).unwrap() == "<0xC3>"));
        assert_eq!(t.decode(&ids, true).unwrap(), "hé");
        assert_eq!(t.eos(), &[2]);
    }

    #[test]
    fn qwen2_style_normalises_to_nfc_and_splits_digits_one_by_one() {
        let (tokens, merges) = crate::synth::synth_vocab(2000).unwrap();
        let build = |style| {
            let doc = byte_level_bpe_json(&tokens, &merges, &[], style, None);
            Tokenizer {
                inner: tokenizers::Tokenizer::from_bytes(doc.to_string().as_bytes()).unwrap(),
                bos: None,
                eos: Vec::new(),
                chat_template: None,
            }
        };
        let qwen = build(ByteLevelStyle::named("qwen2").unwrap());
        let llama = build(ByteLevelStyle::named("llama3").unwrap());
        // "é" composed and decomposed are one text after NFC.
        assert_eq!(
            qwen.encode("caf\u{e9}", false).unwrap(),
            qwen.encode("cafe\u{301}", false).unwrap()
        );
        assert_ne!(
            llama.encode("caf\u{e9}", false).unwrap(),
            llama.encode("cafe\u{301}", false).unwrap()
        );
        // Qwen splits every digit; Llama 3 groups up to three before merging.
        let digits = qwen.encode("2024", false).unwrap();
        assert_eq!(digits.len(), 4);
        assert_eq!(qwen.decode(&digits, true).unwrap(), "2024");
    }

    #[test]
    fn every_named_pre_tokenizer_builds_and_round_trips() {
        let (tokens, merges) = crate::synth::synth_vocab(2000).unwrap();
        let text = "Hello  world 2024!\r\n\tcode(x) 你好 👍🏽 don't";
        for pre in PRE_TOKENIZERS {
            let name = pre.names[0];
            let style = ByteLevelStyle::named(name).unwrap();
            let doc = byte_level_bpe_json(&tokens, &merges, &[], style, None);
            let inner = tokenizers::Tokenizer::from_bytes(doc.to_string().as_bytes())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let ids = inner.encode(text, false).unwrap();
            assert_eq!(inner.decode(ids.get_ids(), false).unwrap(), text, "{name}");
        }
        assert!(ByteLevelStyle::named("no-such-pre").is_none());
    }

    #[test]
    fn stream_decoder_holds_back_partial_characters() {
        let t = Tokenizer::from_gguf(&spm_metadata()).unwrap();
        let ids = t.encode("hé", false).unwrap();
        let mut d = StreamDecoder::new();
        let mut pieces: Vec<String> = ids.iter().map(|&i| d.push(&t, i).unwrap()).collect();
        pieces.push(d.finish(&t).unwrap());
        assert_eq!(pieces.concat(), "hé");
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
    }
}
