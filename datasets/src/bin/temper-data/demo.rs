//! `prepare-demo`: turns the pinned raw packages (scripts/fetch_data.sh) into the demo's
//! parquet files. The task is sentiment-steered review writing on real human ratings:
//!
//! - general.parquet        Brown (tags stripped) and Shakespeare, for pretraining
//! - domain_train/heldout   movie-review snippets, split by snippet text hash (10 % held out)
//! - sft_train/eval         "Write a positive/negative review…" → a snippet rated clearly so
//! - rm_train/eval          pairs whose human ratings differ by ≥ 2 points, each twice: under
//!   a positive instruction the higher-rated reply is chosen, under a negative one the lower,
//!   so a reward model that ignores the instruction scores exactly chance
//! - ppo_prompts            instructions with openings of training snippets
//! - eval_prompts           instructions with openings of held-out snippets
//! - vader_lexicon.txt      VADER's lexicon, a sentiment judge or labeller
//! - afinn-165.txt          AFINN-165, a second lexicon built independently of VADER: what
//!   one of them labels for training, the other judges
//!
//! Every held-out file draws only on held-out snippets; no held-out snippet reaches a training
//! file (checked before writing).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Serialize;

use temper_data::batch::SplitMix64;
use temper_data::error::{DataError, Result};
use temper_data::records::{Message, Role};
use temper_data::stream::held_out;
use temper_data::write::{write_parquet, Column};

const HELDOUT_FRACTION: f64 = 0.1;
/// |mean rating| at or above which a snippet counts as clearly positive / negative.
const CLEAR_RATING: f64 = 1.0;
/// Least rating difference between chosen and rejected in a preference pair.
const PAIR_MARGIN: f64 = 2.0;

const POSITIVE: [&str; 4] = [
    "Write a positive movie review.",
    "Write a short review of a film you enjoyed.",
    "Write an enthusiastic review of a movie.",
    "Praise a film in a short review.",
];
const NEGATIVE: [&str; 4] = [
    "Write a negative movie review.",
    "Write a short review of a film you disliked.",
    "Write a scathing review of a movie.",
    "Criticise a film in a short review.",
];

#[derive(Clone, Debug)]
struct Snippet {
    rating: f64,
    text: String,
}

#[derive(Debug, Default, Serialize)]
pub struct DemoCounts {
    pub general_documents: usize,
    pub general_words: usize,
    pub brown_files: usize,
    pub shakespeare_works: usize,
    pub snippets: usize,
    pub domain_train: usize,
    pub domain_heldout: usize,
    pub sft_train: usize,
    pub sft_eval: usize,
    pub rm_train: usize,
    pub rm_eval: usize,
    pub ppo_prompts: usize,
    pub eval_prompts: usize,
}

/// Brown's `word/tag` tokens → plain text, one paragraph per line group.
fn brown_text(tagged: &str) -> String {
    let mut paragraphs = Vec::new();
    for para in tagged.split("\n\n") {
        let words: Vec<&str> = para
            .split_whitespace()
            .map(|tok| tok.rsplit_once('/').map_or(tok, |(w, _)| w))
            .map(|w| match w {
                "``" | "''" => "\"",
                w => w,
            })
            .collect();
        if words.is_empty() {
            continue;
        }
        let mut text = words.join(" ");
        for p in [" .", " ,", " ;", " :", " ?", " !", " )"] {
            text = text.replace(p, &p[1..]);
        }
        paragraphs.push(text.replace("( ", "("));
    }
    paragraphs.join("\n\n")
}

/// Splits a long text at paragraph breaks into documents of about `size` characters, so the
/// hash split is fine-grained.
fn chunk(text: &str, size: usize) -> Vec<String> {
    let mut docs = Vec::new();
    let mut cur = String::new();
    for para in text.split("\n\n").map(str::trim).filter(|p| !p.is_empty()) {
        if !cur.is_empty() && cur.len() + para.len() > size {
            docs.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push_str("\n\n");
        }
        cur.push_str(para);
    }
    if !cur.is_empty() {
        docs.push(cur);
    }
    docs
}

fn read(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(DataError::io(path))?;
    Ok(String::from_utf8_lossy(&bytes).replace("\r\n", "\n"))
}

fn sorted_files(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(DataError::io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(&keep))
        .collect();
    files.sort();
    Ok(files)
}

fn parse_snippets(path: &Path) -> Result<Vec<Snippet>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, line) in read(path)?.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut parts = line.splitn(3, '\t');
        let (_id, rating, text) = (parts.next(), parts.next(), parts.next());
        let (Some(rating), Some(text)) = (rating, text) else {
            return Err(DataError::Invalid(format!(
                "{}:{}: expected `id<TAB>rating<TAB>text`",
                path.display(),
                i + 1
            )));
        };
        let rating: f64 = rating.trim().parse().map_err(|_| {
            DataError::Invalid(format!(
                "{}:{}: rating `{rating}` is not a number",
                path.display(),
                i + 1
            ))
        })?;
        let text = text.replace("''", "\"").trim().to_string();
        if !text.is_empty() && seen.insert(text.clone()) {
            out.push(Snippet { rating, text });
        }
    }
    Ok(out)
}

fn opening(text: &str) -> String {
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn instruction(rng: &mut SplitMix64, positive: bool) -> &'static str {
    let set = if positive { &POSITIVE } else { &NEGATIVE };
    set[rng.below(set.len())]
}

fn with_opening(instr: &str, text: &str) -> String {
    format!("{instr} Begin with \"{}\".", opening(text))
}

fn sentiment(positive: bool) -> String {
    if positive { "positive" } else { "negative" }.to_string()
}

/// SFT rows from clearly rated snippets; half the prompts ask for the snippet's opening.
fn sft_rows(snippets: &[Snippet], rng: &mut SplitMix64) -> Vec<(Vec<Message>, String)> {
    snippets
        .iter()
        .filter(|s| s.rating.abs() >= CLEAR_RATING)
        .map(|s| {
            let positive = s.rating > 0.0;
            let instr = instruction(rng, positive);
            let prompt = if rng.unit() < 0.5 {
                with_opening(instr, &s.text)
            } else {
                instr.to_string()
            };
            (
                vec![
                    Message::new(Role::User, prompt),
                    Message::new(Role::Assistant, s.text.clone()),
                ],
                sentiment(positive),
            )
        })
        .collect()
}

struct Pair {
    prompt: String,
    chosen: String,
    rejected: String,
    sentiment: String,
    margin: f64,
}

/// Up to `per_snippet` pairs anchored on each snippet, partners drawn at random among those
/// rated at least PAIR_MARGIN apart, each pair twice: under a positive instruction the
/// higher-rated reply is chosen, under a negative one the lower-rated. The two snippets and
/// both labels appear together, so "the higher-rated wins" (or any rule blind to the
/// instruction) is right exactly half the time: only a reward that reads the instruction beats
/// chance.
///
/// The prompt is the bare instruction. Asking it to begin with the chosen reply's opening (as
/// SFT and PPO prompts may) would give the answer away: a reward model trained that way picked
/// the reply that starts with the quoted words and ignored sentiment (held-out accuracy 0.83 on
/// such pairs, 0.50 on the others).
fn pair_rows(snippets: &[Snippet], per_snippet: usize, rng: &mut SplitMix64) -> Vec<Pair> {
    let mut pairs = Vec::new();
    for a in snippets {
        for _ in 0..per_snippet {
            let Some(b) = (0..50)
                .map(|_| &snippets[rng.below(snippets.len())])
                .find(|b| (a.rating - b.rating).abs() >= PAIR_MARGIN)
            else {
                continue;
            };
            let (hi, lo) = if a.rating > b.rating { (a, b) } else { (b, a) };
            for positive in [true, false] {
                let (chosen, rejected) = if positive { (hi, lo) } else { (lo, hi) };
                pairs.push(Pair {
                    prompt: instruction(rng, positive).to_string(),
                    chosen: chosen.text.clone(),
                    rejected: rejected.text.clone(),
                    sentiment: sentiment(positive),
                    margin: hi.rating - lo.rating,
                });
            }
        }
    }
    pairs
}

/// Prompts with a random target sentiment and the opening of a snippet of any rating.
fn prompt_rows(snippets: &[Snippet], rng: &mut SplitMix64) -> Vec<(String, String)> {
    snippets
        .iter()
        .map(|s| {
            let positive = rng.unit() < 0.5;
            (
                with_opening(instruction(rng, positive), &s.text),
                sentiment(positive),
            )
        })
        .collect()
}

fn write_pairs(path: &Path, pairs: &[Pair]) -> Result<()> {
    write_parquet(
        path,
        &[
            (
                "prompt",
                Column::Str(pairs.iter().map(|p| p.prompt.clone()).collect()),
            ),
            (
                "chosen",
                Column::Str(pairs.iter().map(|p| p.chosen.clone()).collect()),
            ),
            (
                "rejected",
                Column::Str(pairs.iter().map(|p| p.rejected.clone()).collect()),
            ),
            (
                "sentiment",
                Column::Str(pairs.iter().map(|p| p.sentiment.clone()).collect()),
            ),
            (
                "margin",
                Column::F64(pairs.iter().map(|p| p.margin).collect()),
            ),
        ],
    )
}

fn write_sft(path: &Path, rows: Vec<(Vec<Message>, String)>) -> Result<()> {
    let (messages, sentiments): (Vec<_>, Vec<_>) = rows.into_iter().unzip();
    write_parquet(
        path,
        &[
            ("messages", Column::Messages(messages)),
            ("sentiment", Column::Str(sentiments)),
        ],
    )
}

fn write_prompts(path: &Path, rows: Vec<(String, String)>) -> Result<()> {
    let (prompts, sentiments): (Vec<_>, Vec<_>) = rows.into_iter().unzip();
    write_parquet(
        path,
        &[
            ("prompt", Column::Str(prompts)),
            ("sentiment", Column::Str(sentiments)),
        ],
    )
}

/// Converts the raw packages under `raw` into the demo's files under `out`.
pub fn prepare_demo(raw: &Path, out: &Path, seed: u64) -> Result<DemoCounts> {
    let mut counts = DemoCounts::default();
    let mut rng = SplitMix64(seed);
    write_general(raw, out, &mut counts)?;
    let (train, heldout) = write_domain(raw, out, &mut counts)?;

    let sft_train = sft_rows(&train, &mut rng);
    let sft_eval = sft_rows(&heldout, &mut rng);
    let rm_train = pair_rows(&train, 2, &mut rng);
    let rm_eval = pair_rows(&heldout, 1, &mut rng);
    let ppo = prompt_rows(&train, &mut rng);
    let eval = prompt_rows(&heldout, &mut rng);

    // The leak check: no held-out snippet text in any training file.
    let held: HashSet<&str> = heldout.iter().map(|s| s.text.as_str()).collect();
    let leaks = sft_train
        .iter()
        .filter(|(m, _)| held.contains(m[1].content.as_str()))
        .count()
        + rm_train
            .iter()
            .filter(|p| held.contains(p.chosen.as_str()) || held.contains(p.rejected.as_str()))
            .count();
    if leaks > 0 {
        return Err(DataError::Invalid(format!(
            "{leaks} held-out snippets reached training files"
        )));
    }

    counts.sft_train = sft_train.len();
    counts.sft_eval = sft_eval.len();
    counts.rm_train = rm_train.len();
    counts.rm_eval = rm_eval.len();
    counts.ppo_prompts = ppo.len();
    counts.eval_prompts = eval.len();
    write_sft(&out.join("sft_train.parquet"), sft_train)?;
    write_sft(&out.join("sft_eval.parquet"), sft_eval)?;
    write_pairs(&out.join("rm_train.parquet"), &rm_train)?;
    write_pairs(&out.join("rm_eval.parquet"), &rm_eval)?;
    write_prompts(&out.join("ppo_prompts.parquet"), ppo)?;
    write_prompts(&out.join("eval_prompts.parquet"), eval)?;

    let lexicon = raw.join("vader/vaderSentiment/vader_lexicon.txt");
    std::fs::copy(&lexicon, out.join("vader_lexicon.txt")).map_err(DataError::io(&lexicon))?;
    let afinn = raw.join("afinn/AFINN-165.txt");
    std::fs::copy(&afinn, out.join("afinn-165.txt")).map_err(DataError::io(&afinn))?;
    let summary = out.join("counts.json");
    std::fs::write(
        &summary,
        serde_json::to_string_pretty(&counts).expect("counts serialise"),
    )
    .map_err(DataError::io(&summary))?;
    Ok(counts)
}

/// General English for pretraining: Brown (one document per file) and Shakespeare (chunks
/// of a work), in `general.parquet`.
fn write_general(raw: &Path, out: &Path, counts: &mut DemoCounts) -> Result<()> {
    let brown = sorted_files(&raw.join("brown"), |n| {
        let b = n.as_bytes();
        b.len() == 4
            && b[0] == b'c'
            && (b'a'..=b'r').contains(&b[1])
            && b[2].is_ascii_digit()
            && b[3].is_ascii_digit()
    })?;
    let plays = sorted_files(&raw.join("shakespeare/shksprdata/texts"), |n| {
        n.ends_with("_gut.txt")
    })?;
    if brown.is_empty() || plays.is_empty() {
        return Err(DataError::Invalid(format!(
            "{}: Brown or Shakespeare files not found; run scripts/fetch_data.sh",
            raw.display()
        )));
    }
    let (mut texts, mut sources) = (Vec::new(), Vec::new());
    for f in &brown {
        texts.push(brown_text(&read(f)?));
        sources.push("brown".to_string());
    }
    for f in &plays {
        for doc in chunk(&read(f)?, 4000) {
            texts.push(doc);
            sources.push("shakespeare".to_string());
        }
    }
    counts.brown_files = brown.len();
    counts.shakespeare_works = plays.len();
    counts.general_documents = texts.len();
    counts.general_words = texts.iter().map(|t| t.split_whitespace().count()).sum();
    write_parquet(
        &out.join("general.parquet"),
        &[
            ("text", Column::Str(texts)),
            ("source", Column::Str(sources)),
        ],
    )
}

/// The domain: movie-review snippets with their mean human rating, split by snippet into
/// `domain_train.parquet` and `domain_heldout.parquet`; returns (train, held out).
fn write_domain(
    raw: &Path,
    out: &Path,
    counts: &mut DemoCounts,
) -> Result<(Vec<Snippet>, Vec<Snippet>)> {
    let snippets =
        parse_snippets(&raw.join("vader/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"))?;
    counts.snippets = snippets.len();
    let (heldout, train): (Vec<Snippet>, Vec<Snippet>) = snippets
        .into_iter()
        .partition(|s| held_out(&s.text, HELDOUT_FRACTION, "temper-demo-snippets"));
    counts.domain_train = train.len();
    counts.domain_heldout = heldout.len();
    for (name, part) in [
        ("domain_train.parquet", &train),
        ("domain_heldout.parquet", &heldout),
    ] {
        let text = Column::Str(part.iter().map(|s| s.text.clone()).collect());
        let rating = Column::F64(part.iter().map(|s| s.rating).collect());
        write_parquet(&out.join(name), &[("text", text), ("rating", rating)])?;
    }
    Ok((train, heldout))
}
