//! Tokenizers: load any `tokenizer.json`, or train a byte-level BPE (GPT-2's scheme) on a
//! corpus with the chat template's special tokens. Special-token strings inside user text are
//! encoded as plain text; template markers are inserted by id, so no data can forge a turn.

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::byte_level::ByteLevel as ByteLevelProcessor;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{DataError, Result};

/// End of text / end of an assistant turn. Also the pretraining document separator.
pub const EOS: &str = "<|endoftext|>";
pub const PAD: &str = "<|pad|>";
pub const SYSTEM: &str = "<|system|>";
pub const USER: &str = "<|user|>";
pub const ASSISTANT: &str = "<|assistant|>";
/// Trained tokenizers get these ids 0..5, in this order.
pub const SPECIAL_TOKENS: [&str; 5] = [EOS, PAD, SYSTEM, USER, ASSISTANT];

/// Each token's (start, end) byte offsets in the text it came from.
pub type ByteRanges = Vec<(usize, usize)>;

pub struct TextTokenizer {
    inner: Tokenizer,
    /// The same tokenizer recognising special tokens in text: for the text a model's own
    /// (Jinja) chat template renders, whose markers are written out as strings. Made on first
    /// use, so temper's own template (markers by id) never pays for the copy.
    rendered: std::sync::OnceLock<Tokenizer>,
    pub path: PathBuf,
}

impl TextTokenizer {
    pub fn load(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(DataError::Tokenizer {
                path: path.into(),
                message: "file not found".into(),
            });
        }
        let mut inner = Tokenizer::from_file(path).map_err(|e| DataError::Tokenizer {
            path: path.into(),
            message: e.to_string(),
        })?;
        inner.set_encode_special_tokens(true);
        Ok(Self {
            inner,
            rendered: std::sync::OnceLock::new(),
            path: path.into(),
        })
    }

    fn err(&self, e: impl ToString) -> DataError {
        DataError::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Token ids of `text`, with no special tokens added and none recognised in the text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode_fast(text, false)
            .map_err(|e| self.err(e))?
            .get_ids()
            .to_vec())
    }

    /// Token ids of text a chat template rendered, special tokens recognised (as
    /// transformers' `apply_chat_template` tokenizes), with each token's byte range.
    pub fn encode_rendered(&self, text: &str) -> Result<(Vec<u32>, ByteRanges)> {
        let rendered = self.rendered.get_or_init(|| {
            let mut t = self.inner.clone();
            t.set_encode_special_tokens(false);
            t
        });
        let enc = rendered.encode(text, false).map_err(|e| self.err(e))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Whether `id` is one of the tokenizer's special added tokens (`<|im_end|>`, `</s>`).
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_vocabulary()
            .simple_id_to_token(id)
            .is_some_and(|t| self.inner.get_added_vocabulary().is_special_token(&t))
    }

    /// Text of `ids`; special tokens are written out (`<|user|>`) so renderings show them.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| self.err(e))
    }

    pub fn id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The id of a token the caller needs, or an error saying which is missing.
    pub fn require(&self, token: &str) -> Result<u32> {
        self.id(token).ok_or_else(|| {
            self.err(format!(
                "lacks the special token {token}; temper's chat template needs {} (train one with `temper-data train-tokenizer`)",
                SPECIAL_TOKENS.join(" ")
            ))
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// The smallest vocabulary a BPE can have: the special tokens and the 256 byte symbols.
pub const MIN_VOCAB: usize = SPECIAL_TOKENS.len() + 256;

/// Trains a byte-level BPE of `vocab_size` entries (special tokens included) on `docs`. With
/// `split_digits` every digit is its own pre-token (as Llama's and Qwen's tokenizers do), so
/// numbers are spelled digit by digit and arithmetic sees each place value.
pub fn train_bpe<I, S>(
    docs: I,
    vocab_size: usize,
    min_frequency: u64,
    split_digits: bool,
) -> Result<Tokenizer>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let floor = SPECIAL_TOKENS.len() + ByteLevel::alphabet().len();
    if vocab_size <= floor {
        return Err(DataError::Invalid(format!(
            "vocab_size {vocab_size} is too small: the 256 byte symbols and {} special tokens alone take {floor}",
            SPECIAL_TOKENS.len()
        )));
    }
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(min_frequency)
        .show_progress(false)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|t| AddedToken::from(*t, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    let mut tokenizer = Tokenizer::new(BPE::default());
    let byte_level = ByteLevel::default().add_prefix_space(false);
    if split_digits {
        tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(byte_level),
        ]))));
    } else {
        tokenizer.with_pre_tokenizer(Some(byte_level));
    }
    tokenizer.with_post_processor(Some(ByteLevelProcessor::default().trim_offsets(false)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    tokenizer
        .train(&mut trainer, docs)
        .map_err(|e| DataError::Invalid(format!("BPE training failed: {e}")))?;
    Ok(tokenizer)
}

/// Saves a tokenizer as `tokenizer.json`, atomically.
pub fn save_tokenizer(tokenizer: &Tokenizer, path: &Path) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    tokenizer
        .save(&tmp, false)
        .map_err(|e| DataError::Tokenizer {
            path: path.into(),
            message: e.to_string(),
        })?;
    std::fs::rename(&tmp, path).map_err(DataError::io(path))
}

/// Files beside `tokenizer.json` that a checkpoint carries through unchanged.
const CARRIED_FILES: [&str; 4] = [
    crate::jinja::TOKENIZER_CONFIG,
    "special_tokens_map.json",
    crate::jinja::TEMPLATE_FILE,
    "generation_config.json",
];

/// The tokenizer files a saved checkpoint holds, read from beside `tokenizer_json`:
/// `tokenizer.json` and the model's own `tokenizer_config.json`, `special_tokens_map.json`,
/// `chat_template.jinja` and `generation_config.json` where it has them. A tokenizer temper trained has no
/// `tokenizer_config.json`; it gets one naming its special tokens and temper's chat template,
/// so `AutoTokenizer` and `apply_chat_template` in transformers work on every checkpoint.
pub fn checkpoint_tokenizer_files(tokenizer_json: &Path) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let read = |p: &Path| std::fs::read(p).map_err(DataError::io(p));
    let mut files = vec![("tokenizer.json", read(tokenizer_json)?)];
    let dir = tokenizer_json.parent().unwrap_or(Path::new("."));
    for name in CARRIED_FILES {
        let path = dir.join(name);
        if path.is_file() {
            files.push((name, read(&path)?));
        }
    }
    let has_config = files
        .iter()
        .any(|(n, _)| *n == crate::jinja::TOKENIZER_CONFIG);
    if !has_config {
        let tok = TextTokenizer::load(tokenizer_json)?;
        if SPECIAL_TOKENS.iter().all(|t| tok.id(t).is_some()) {
            let config = serde_json::json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "chat_template": crate::chat::TEMPER_TEMPLATE,
                "eos_token": EOS,
                "pad_token": PAD,
                "bos_token": null,
                "unk_token": null,
                "clean_up_tokenization_spaces": false,
                "model_max_length": 1_000_000_000_000_000_000u64,
            });
            let text = serde_json::to_string_pretty(&config).expect("a JSON value serialises");
            files.push((crate::jinja::TOKENIZER_CONFIG, text.into_bytes()));
        }
    }
    Ok(files)
}
