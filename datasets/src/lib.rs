//! temper-data: everything between files on disk and token ids, with no tch.
//!
//! Readers (txt, jsonl, parquet) yield rows; record parsers turn rows into text documents, SFT
//! conversations, preference pairs or prompts; the chat template renders conversations into ids
//! with loss masks; the pretraining stream and batching turn those into what the stages train
//! on. Every error names the file, line or row, and field.

pub mod batch;
pub mod chat;
pub mod error;
pub mod inspect;
pub mod jinja;
pub mod load;
pub mod read;
pub mod records;
pub mod stream;
pub mod tokenizer;
pub mod write;

pub use batch::{
    length_grouped_batches, pack, pad_right, pass_batch, seed_for, seeds_for, shuffled, Batch,
    Epochs, Overlong,
};
pub use chat::{ChatTemplate, Example, TEMPER_TEMPLATE};
pub use error::{DataError, Location, Result};
pub use load::{LoadOptions, LoadReport, RenderedPair};
pub use read::{read_rows, Row, TextSplit};
pub use records::{
    Fields, Message, PreferencePair, PromptRecord, RecordParser, Role, UnpairedExample,
};
pub use stream::{build_stream, StreamSettings, TokenStream};
pub use tokenizer::{save_tokenizer, train_bpe, TextTokenizer};
