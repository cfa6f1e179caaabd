//! temper-data on small, real files: every reader and record kind, the chat template's masks,
//! BPE round trips, a tokenizer.json made by Hugging Face's library, the leak-free split, the
//! token cache and batching. Bad input and the demo conversion are in errors_and_demo.rs.

mod common;

use common::{rows_of, tokenizer, write, CORPUS};

use std::path::Path;

use temper_data::batch::{length_grouped_batches, pack, pad_right, shuffled};
use temper_data::chat::{ChatTemplate, Example};
use temper_data::records::{Fields, Message, RecordParser, Role};
use temper_data::stream::{build_stream, is_validation, StreamSettings};
use temper_data::tokenizer::{TextTokenizer, ASSISTANT, EOS, USER};
use temper_data::write::{write_parquet, Column};
use temper_data::{read_rows, TextSplit};

#[test]
fn readers_yield_the_same_records_from_txt_jsonl_and_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let txt = write(
        dir.path(),
        "a.txt",
        "first doc\nstill first\r\n\r\n\n second doc \n",
    );
    assert_eq!(
        rows_of(&txt),
        vec![
            serde_json::json!({"text": "first doc\nstill first"}),
            serde_json::json!({"text": "second doc"})
        ]
    );
    let whole: Vec<_> = read_rows(&txt, TextSplit::File).unwrap().collect();
    assert_eq!(whole.len(), 1);

    let jsonl = write(
        dir.path(),
        "a.jsonl",
        "{\"text\": \"first doc\"}\n\n{\"text\": \"second\", \"n\": 2}\n",
    );
    let rows: Vec<_> = read_rows(&jsonl, TextSplit::File)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1].location.to_string(), "line 3");

    let pq = dir.path().join("a.parquet");
    let conv = vec![
        Message::new(Role::User, "hi"),
        Message::new(Role::Assistant, "hello"),
    ];
    write_parquet(
        &pq,
        &[
            ("text", Column::Str(vec!["x".into(), "y".into()])),
            ("score", Column::F64(vec![1.5, -2.0])),
            ("messages", Column::Messages(vec![conv.clone(), conv])),
        ],
    )
    .unwrap();
    let rows: Vec<_> = read_rows(&pq, TextSplit::File)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows[1].location.to_string(), "row 1");
    assert_eq!(rows[1].value["score"], -2.0);
    assert_eq!(
        rows[0].value["messages"][1],
        serde_json::json!({"role": "assistant", "content": "hello"})
    );
}

#[test]
fn record_kinds_parse_alpaca_messages_pairs_and_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "sft.jsonl",
        concat!(
            r#"{"instruction": "Summarise", "input": "a long text", "output": "short", "system": "be brief"}"#,
            "\n",
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "more"}, {"role": "assistant", "content": "ok"}]}"#,
            "\n",
            r#"{"prompt": "p", "chosen": "good", "rejected": "bad"}"#,
            "\n",
            r#"{"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": "c"}], "rejected": [{"role": "assistant", "content": "r"}], "sentiment": "positive"}"#,
            "\n",
            r#"{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}"#,
            "\n",
            r#"{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}], "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]}"#,
            "\n",
            r#"{"chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]}"#,
            "\n",
            r#"{"conversations": [{"from": "tool", "value": "s"}]}"#,
            "\n",
        ),
    );
    let fields = Fields::default();
    let p = RecordParser {
        path: &f,
        fields: &fields,
    };
    let rows: Vec<_> = read_rows(&f, TextSplit::File)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let alpaca = p.sft(&rows[0]).unwrap();
    assert_eq!(
        alpaca,
        vec![
            Message::new(Role::System, "be brief"),
            Message::new(Role::User, "Summarise\n\na long text"),
            Message::new(Role::Assistant, "short"),
        ]
    );
    assert_eq!(p.sft(&rows[1]).unwrap().len(), 4);
    let pair = p.pair(&rows[2]).unwrap();
    assert_eq!(pair.prompt, vec![Message::new(Role::User, "p")]);
    assert_eq!(pair.chosen, vec![Message::new(Role::Assistant, "good")]);
    assert_eq!(
        p.pair(&rows[3]).unwrap().rejected,
        vec![Message::new(Role::Assistant, "r")]
    );
    let prompt = p.prompt(&rows[3]).unwrap();
    assert_eq!(prompt.messages, vec![Message::new(Role::User, "p")]);
    assert_eq!(prompt.meta["sentiment"], "positive");
    // ShareGPT conversations.
    assert_eq!(
        p.sft(&rows[4]).unwrap(),
        vec![
            Message::new(Role::System, "s"),
            Message::new(Role::User, "q"),
            Message::new(Role::Assistant, "a"),
        ]
    );
    // TRL's implicit prompt: the shared opening turns.
    let implicit = p.pair(&rows[5]).unwrap();
    assert_eq!(implicit.prompt, vec![Message::new(Role::User, "q")]);
    assert_eq!(implicit.chosen, vec![Message::new(Role::Assistant, "good")]);
    assert_eq!(
        implicit.rejected,
        vec![Message::new(Role::Assistant, "bad")]
    );
    let e = p.pair(&rows[6]).unwrap_err().to_string();
    assert!(e.contains("share no opening turns"), "{e}");
    let e = p.sft(&rows[7]).unwrap_err().to_string();
    assert!(
        e.contains("conversations[0].from") && e.contains("unknown role `tool`"),
        "{e}"
    );

    // Custom field names.
    let g = write(
        dir.path(),
        "custom.jsonl",
        "{\"q\": \"hi\", \"a\": \"there\"}\n",
    );
    let custom = Fields {
        instruction: "q".into(),
        output: "a".into(),
        ..Fields::default()
    };
    let row = read_rows(&g, TextSplit::File)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(
        RecordParser {
            path: &g,
            fields: &custom
        }
        .sft(&row)
        .unwrap()[1]
            .content,
        "there"
    );
}

#[test]
fn only_assistant_tokens_and_their_eos_carry_loss() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let tpl = ChatTemplate::new(&tok).unwrap();
    let conv = vec![
        Message::new(Role::System, "Be kind."),
        Message::new(Role::User, "Review the film."),
        Message::new(Role::Assistant, "A delight."),
        Message::new(Role::User, "And another?"),
        Message::new(Role::Assistant, "Dull."),
    ];
    let ex = tpl.render(&tok, &conv, false).unwrap();
    assert_eq!(ex.ids.len(), ex.loss_mask.len());
    let trained: Vec<u32> = ex
        .ids
        .iter()
        .zip(&ex.loss_mask)
        .filter(|(_, &m)| m == 1)
        .map(|(&t, _)| t)
        .collect();
    let expected = [
        tok.encode("A delight.").unwrap(),
        vec![tpl.eos],
        tok.encode("Dull.").unwrap(),
        vec![tpl.eos],
    ]
    .concat();
    assert_eq!(
        trained, expected,
        "exactly the replies and their EOS are trained"
    );
    // Markers are never trained, the assistant marker included.
    for (t, m) in ex.ids.iter().zip(&ex.loss_mask) {
        let markers = ["<|user|>", "<|assistant|>", "<|system|>"].map(|m| tok.id(m).unwrap());
        if markers.contains(t) {
            assert_eq!(*m, 0);
        }
    }
    assert_eq!(tok.decode(&ex.ids).unwrap(), "<|system|>Be kind.<|user|>Review the film.<|assistant|>A delight.<|endoftext|><|user|>And another?<|assistant|>Dull.<|endoftext|>");
    let all = tpl.render(&tok, &conv, true).unwrap();
    assert!(all.loss_mask.iter().all(|&m| m == 1));

    // The generation prompt is an exact prefix of the rendered conversation (SFT = RM = PPO).
    let prompt = tpl.render_prompt(&tok, &conv[..4]).unwrap();
    assert_eq!(&ex.ids[..prompt.len()], &prompt[..]);
    assert_eq!(
        &ex.ids[prompt.len()..],
        &[tok.encode("Dull.").unwrap(), vec![tpl.eos]].concat()[..]
    );
}

#[test]
fn bpe_round_trips_text_exactly_and_never_forges_special_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    assert_eq!(tok.vocab_size(), 400);
    assert_eq!(tok.id(EOS), Some(0));
    for text in CORPUS.iter().copied().chain([
        "  leading and   inner   spaces\tand tabs\nnew lines  ",
        "unseen words: zyzzyva, qwertyuiop 12345!",
        "emoji 🎬 and <|user|> typed by a user",
    ]) {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
        assert!(
            !ids.contains(&tok.id(USER).unwrap()),
            "user text produced a role marker"
        );
        assert!(!ids.contains(&tok.id(ASSISTANT).unwrap()));
    }
}

#[test]
fn a_gpt2_style_tokenizer_json_from_hugging_face_loads() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizer/gpt2_style.json");
    let tok = TextTokenizer::load(&path).unwrap();
    // The ids Hugging Face's tokenizers computed (scripts/make_tokenizer_fixture.py).
    let ids = tok.encode("The best film of the year.").unwrap();
    assert_eq!(
        ids,
        vec![276, 272, 263, 286, 77, 265, 259, 221, 89, 283, 14]
    );
    assert_eq!(tok.decode(&ids).unwrap(), "The best film of the year.");
    assert_eq!(tok.id(EOS), Some(0));
    // It has no chat markers, and the template says which are missing.
    let err = ChatTemplate::new(&tok).unwrap_err().to_string();
    assert!(
        err.contains("lacks the special token <|pad|>")
            || err.contains("lacks the special token <|system|>"),
        "{err}"
    );
}

#[test]
fn the_split_never_leaks_and_the_cache_hits_on_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let docs: Vec<String> = (0..60)
        .map(|i| format!("Document number {i}: {}", CORPUS[i % CORPUS.len()]))
        .collect();
    let a = write(dir.path(), "a.txt", &docs[..40].join("\n\n"));
    // The second file repeats a document of the first: it must land on the same side.
    let b = write(
        dir.path(),
        "b.jsonl",
        &docs[30..]
            .iter()
            .map(|d| serde_json::json!({"text": d}).to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let settings = StreamSettings {
        block_size: 8,
        val_fraction: 0.3,
        ..Default::default()
    };
    let cache = dir.path().join("cache");
    let s = build_stream(&[a.clone(), b.clone()], &tok, &settings, Some(&cache)).unwrap();
    assert!(!s.from_cache);
    assert_eq!(s.stats.documents, 70);
    assert!(
        s.stats.val_documents > 5 && s.stats.train_documents > 30,
        "{:?}",
        s.stats
    );
    assert_eq!(s.train.len() % 8, 0);
    let val_text = tok.decode(&s.val).unwrap();
    let train_text = tok.decode(&s.train).unwrap();
    for d in &docs {
        let held = is_validation(d, 0.3);
        // A whole document sits in its split; the other never holds it (blocks may cut a
        // document at the edge of the kept tokens, so check containment one way).
        if held {
            assert!(
                !train_text.contains(d.as_str()),
                "held-out document in train: {d}"
            );
        } else {
            assert!(
                !val_text.contains(d.as_str()),
                "training document in validation: {d}"
            );
        }
    }
    let again = build_stream(&[a.clone(), b.clone()], &tok, &settings, Some(&cache)).unwrap();
    assert!(again.from_cache, "second build did not hit the cache");
    assert_eq!(
        (again.train, again.val, again.stats),
        (s.train.clone(), s.val.clone(), s.stats.clone())
    );
    let other = StreamSettings {
        block_size: 16,
        ..settings
    };
    assert!(
        !build_stream(&[a, b], &tok, &other, Some(&cache))
            .unwrap()
            .from_cache,
        "a changed setting must miss"
    );
}

#[test]
fn batches_pad_group_pack_and_shuffle_deterministically() {
    let ex = |n: usize| Example {
        ids: (1..=n as u32).collect(),
        loss_mask: vec![1; n],
    };
    let (a, b) = (ex(3), ex(5));
    let batch = pad_right(&[&a, &b], 9);
    assert_eq!((batch.rows, batch.cols), (2, 5));
    assert_eq!(batch.ids[..5], [1, 2, 3, 9, 9]);
    assert_eq!(batch.attention_mask[..5], [1, 1, 1, 0, 0]);
    assert_eq!(batch.loss_mask[5..], [1, 1, 1, 1, 1]);

    let lengths: Vec<usize> = (0..400).map(|i| 5 + (i * 37) % 200).collect();
    let padding = |batches: &[Vec<usize>]| -> usize {
        batches
            .iter()
            .map(|b| {
                let m = b.iter().map(|&i| lengths[i]).max().unwrap();
                b.iter().map(|&i| m - lengths[i]).sum::<usize>()
            })
            .sum()
    };
    let grouped = length_grouped_batches(&lengths, 8, 1);
    let random: Vec<Vec<usize>> = shuffled(400, 1).chunks(8).map(<[usize]>::to_vec).collect();
    assert!(
        padding(&grouped) * 5 < padding(&random),
        "grouping saved too little padding"
    );
    let mut all: Vec<usize> = grouped.concat();
    all.sort();
    assert_eq!(
        all,
        (0..400).collect::<Vec<_>>(),
        "every example exactly once"
    );
    assert_eq!(length_grouped_batches(&lengths, 8, 1), grouped);
    assert_ne!(shuffled(50, 1), shuffled(50, 2));

    let packed = pack(&[ex(3), ex(4), ex(2), ex(6), ex(9)], 8);
    assert_eq!(
        packed.iter().map(Example::len).collect::<Vec<_>>(),
        vec![7, 8, 9]
    );
}
