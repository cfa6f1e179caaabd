//! temper-data's bad-input errors (each names file, line or row, and field), the over-long
//! policy, and the demo conversion on a small raw tree.

mod common;

use common::{rows_of, tokenizer, write};
use temper_data::batch::Overlong;
use temper_data::chat::ChatTemplate;
use temper_data::records::Fields;
use temper_data::stream::is_validation;
use temper_data::LoadOptions;

/// One line of error text from loading `content` as `name` with `kind`.
fn error_of(name: &str, content: &[u8], kind: &str, max_len: usize, overlong: Overlong) -> String {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let path = dir.path().join(name);
    std::fs::write(&path, content).unwrap();
    let fields = Fields::default();
    let opts = LoadOptions {
        tokenizer: &tok,
        template: ChatTemplate::new(&tok).unwrap(),
        fields: &fields,
        max_len,
        overlong,
        train_on_prompt: false,
    };
    let err = match kind {
        "sft" => opts.sft(&path).err(),
        "pairs" => opts.pairs(&path).err(),
        _ => opts.prompts(&path).err(),
    };
    err.expect("must fail")
        .to_string()
        .replace(&format!("{}/", dir.path().display()), "")
}

#[test]
fn bad_input_is_an_error_naming_file_line_and_field() {
    let good = r#"{"instruction": "a", "output": "b"}"#;
    let e = error_of(
        "x.jsonl",
        format!("{good}\n{good}\n{{\"instruction\": \"a\", \n").as_bytes(),
        "sft",
        64,
        Overlong::Error,
    );
    assert!(e.starts_with("x.jsonl:3: malformed JSON"), "{e}");
    let e = error_of(
        "x.jsonl",
        format!("{good}\n{{\"instruction\": \"a\"}}\n").as_bytes(),
        "sft",
        64,
        Overlong::Error,
    );
    assert_eq!(e, "x.jsonl: line 2: field `output`: missing");
    let e = error_of(
        "x.jsonl",
        b"{\"instruction\": 7, \"output\": \"b\"}\n",
        "sft",
        64,
        Overlong::Error,
    );
    assert_eq!(
        e,
        "x.jsonl: line 1: field `instruction`: expected a string, got a number"
    );
    let e = error_of(
        "x.jsonl",
        b"{\"prompt\": \"p\", \"chosen\": \"c\"}\n",
        "pairs",
        64,
        Overlong::Error,
    );
    assert_eq!(e, "x.jsonl: line 1: field `rejected`: missing");
    let e = error_of(
        "x.jsonl",
        b"{\"messages\": [{\"role\": \"bot\", \"content\": \"c\"}]}\n",
        "sft",
        64,
        Overlong::Error,
    );
    assert!(
        e.contains("line 1: field `messages[0].role`: unknown role `bot`"),
        "{e}"
    );
    let e = error_of("x.jsonl", b"", "sft", 64, Overlong::Error);
    assert_eq!(e, "x.jsonl: no records: the file is empty");
    let e = error_of(
        "x.parquet",
        b"PAR1 this is not parquet",
        "prompts",
        64,
        Overlong::Error,
    );
    assert!(e.starts_with("x.parquet: unreadable parquet"), "{e}");
    let e = error_of("x.csv", b"a,b", "sft", 64, Overlong::Error);
    assert!(e.contains("unsupported file type"), "{e}");
    let long = r#"{"instruction": "a", "output": "this reply is far longer than the tiny context allows"}"#;
    let e = error_of(
        "x.jsonl",
        format!("{good}\n{long}\n").as_bytes(),
        "sft",
        12,
        Overlong::Error,
    );
    assert!(
        e.starts_with("x.jsonl: line 2: example has") && e.contains("over the limit of 12"),
        "{e}"
    );
    // Skipping every example leaves nothing to train on: an error, not an empty dataset.
    let e = error_of(
        "x.jsonl",
        format!("{long}\n").as_bytes(),
        "sft",
        12,
        Overlong::Skip,
    );
    assert!(e.contains("no usable examples (1 rows, 1 skipped"), "{e}");
}

#[test]
fn overlong_examples_are_truncated_or_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let good = r#"{"instruction": "a", "output": "b"}"#;
    let long = r#"{"instruction": "a", "output": "this reply is far longer than the tiny context allows"}"#;
    let path = write(dir.path(), "x.jsonl", &format!("{good}\n{long}\n{good}\n"));
    let fields = Fields::default();
    let mut opts = LoadOptions {
        tokenizer: &tok,
        template: ChatTemplate::new(&tok).unwrap(),
        fields: &fields,
        max_len: 12,
        overlong: Overlong::Skip,
        train_on_prompt: false,
    };
    let (kept, report) = opts.sft(&path).unwrap();
    assert_eq!(
        (kept.len(), report.rows, report.skipped, report.truncated),
        (2, 3, 1, 0)
    );
    opts.overlong = Overlong::Truncate;
    let (kept, report) = opts.sft(&path).unwrap();
    assert_eq!((kept.len(), report.truncated), (3, 1));
    assert!(kept.iter().all(|e| e.len() <= 12));
}

#[test]
fn prepare_demo_converts_a_raw_tree_without_leaking_held_out_snippets() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw");
    for sub in [
        "brown",
        "shakespeare/shksprdata/texts",
        "vader/hutto_ICWSM_2014",
        "vader/vaderSentiment",
        "afinn",
    ] {
        std::fs::create_dir_all(raw.join(sub)).unwrap();
    }
    write(
        &raw.join("brown"),
        "ca01",
        "\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ./.\n\n\tIt/pps ended/vbd ./.\n",
    );
    write(&raw.join("brown"), "README", "not a corpus file");
    write(
        &raw.join("shakespeare/shksprdata/texts"),
        "hamlet_gut.txt",
        "ACT I.\n\nTo be, or not to be.\n",
    );
    write(
        &raw.join("shakespeare/shksprdata/texts"),
        "hamlet_gut_f.txt",
        "a folio variant, not used",
    );
    let snippets: String = (0..300)
        .map(|i| {
            format!(
                "{i}\t{:.2}\tSnippet {i} is {} indeed\r\n",
                (i % 9) as f64 - 4.0,
                if i % 9 > 4 { "great" } else { "awful" }
            )
        })
        .collect();
    write(
        &raw.join("vader/hutto_ICWSM_2014"),
        "movieReviewSnippets_GroundTruth.txt",
        &snippets,
    );
    write(
        &raw.join("vader/vaderSentiment"),
        "vader_lexicon.txt",
        "great\t3.1\t0.5\t[3]\n",
    );
    write(&raw.join("afinn"), "AFINN-165.txt", "great\t3\nawful\t-3\n");
    let out = dir.path().join("demo");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_temper-data"))
        .args(["prepare-demo", "--seed", "7", "--raw"])
        .arg(&raw)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let counts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("counts.json")).unwrap()).unwrap();
    let n = |k: &str| counts[k].as_u64().unwrap() as usize;
    assert_eq!(
        (n("brown_files"), n("shakespeare_works"), n("snippets")),
        (1, 1, 300)
    );
    assert_eq!(n("domain_train") + n("domain_heldout"), 300);
    assert!(
        n("domain_heldout") > 10 && n("rm_train") > 100 && n("sft_train") > 100,
        "{counts}"
    );
    // Both lexicons are copied as they are: VADER's and AFINN-165.
    assert_eq!(
        std::fs::read_to_string(out.join("afinn-165.txt")).unwrap(),
        "great\t3\nawful\t-3\n"
    );
    let general = rows_of(&out.join("general.parquet"));
    assert_eq!(general[0]["text"], "The jury said \" no \".\n\nIt ended.");
    let texts = |f: &str, col: &str| -> Vec<String> {
        rows_of(&out.join(f))
            .iter()
            .map(|r| r[col].as_str().unwrap().to_string())
            .collect()
    };
    let held: std::collections::HashSet<String> = texts("domain_heldout.parquet", "text")
        .into_iter()
        .collect();
    for (file, col) in [
        ("domain_train.parquet", "text"),
        ("rm_train.parquet", "chosen"),
        ("rm_train.parquet", "rejected"),
    ] {
        assert!(
            texts(file, col).iter().all(|t| !held.contains(t)),
            "{file}.{col} holds a held-out snippet"
        );
    }
    // The held-out split is independent of a stage's own validation split: some training
    // snippets must still be held out by the stream (a shared hash would leave none).
    let train_texts = texts("domain_train.parquet", "text");
    assert!(
        train_texts.iter().any(|t| is_validation(t, 0.1)),
        "the demo split and the stream split are correlated"
    );
    for row in rows_of(&out.join("sft_train.parquet")) {
        assert!(!held.contains(row["messages"][1]["content"].as_str().unwrap()));
    }
    // The margin is at least 2 points, and no pair's prompt quotes a reply.
    let pairs = rows_of(&out.join("rm_train.parquet"));
    for row in &pairs {
        assert!(row["margin"].as_f64().unwrap() >= 2.0);
        assert!(!row["prompt"].as_str().unwrap().contains("Begin with"));
    }
    // Every pair stands twice, under each instruction with the labels swapped, so a rule
    // blind to the instruction is right exactly half the time.
    let key = |r: &serde_json::Value, s: &str| {
        (
            r["chosen"].as_str().unwrap().to_string(),
            r["rejected"].as_str().unwrap().to_string(),
            s.to_string(),
        )
    };
    let all: std::collections::HashSet<_> = pairs
        .iter()
        .map(|r| key(r, r["sentiment"].as_str().unwrap()))
        .collect();
    for r in &pairs {
        let (c, rj, s) = key(r, r["sentiment"].as_str().unwrap());
        let flipped = if s == "positive" {
            "negative"
        } else {
            "positive"
        };
        assert!(
            all.contains(&(rj, c, flipped.to_string())),
            "{r} has no mirror"
        );
    }
    assert_eq!(pairs.len() % 2, 0);
}
