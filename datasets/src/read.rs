//! Readers for `.txt`, `.jsonl` and `.parquet`, chosen by extension. Every reader yields rows
//! as JSON values with their location, so record parsing (records.rs) is written once and its
//! errors name the line or row. JSONL and parquet stream (a line / a record batch at a time);
//! a text file is one document, or one per blank-line-separated block.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float32Array, Float64Array, Int32Array, Int64Array,
    StructArray,
};
use arrow::datatypes::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{DataError, Location, Result};

/// One record of a file, as JSON, with where it came from.
#[derive(Clone, Debug)]
pub struct Row {
    pub location: Location,
    pub value: Value,
}

/// How a `.txt` file splits into documents; each becomes a row `{"text": ...}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextSplit {
    /// The whole file is one document.
    #[default]
    File,
    /// Documents are separated by one or more blank lines.
    BlankLine,
}

/// All rows of `path`; an empty file is an error, not zero rows.
pub fn read_rows(path: &Path, split: TextSplit) -> Result<Box<dyn Iterator<Item = Result<Row>>>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let inner: Box<dyn Iterator<Item = Result<Row>>> = match ext {
        "jsonl" | "json" => Box::new(jsonl_rows(path)?),
        "parquet" => Box::new(parquet_rows(path)?),
        "txt" => Box::new(text_rows(path, split)?.into_iter().map(Ok)),
        _ => return Err(DataError::UnsupportedFormat { path: path.into() }),
    };
    Ok(Box::new(NonEmpty {
        inner,
        path: path.into(),
        seen: false,
    }))
}

struct NonEmpty {
    inner: Box<dyn Iterator<Item = Result<Row>>>,
    path: PathBuf,
    seen: bool,
}

impl Iterator for NonEmpty {
    type Item = Result<Row>;
    fn next(&mut self) -> Option<Result<Row>> {
        match self.inner.next() {
            Some(row) => {
                self.seen = true;
                Some(row)
            }
            None if !self.seen => {
                self.seen = true;
                Some(Err(DataError::Empty {
                    path: self.path.clone(),
                }))
            }
            None => None,
        }
    }
}

fn jsonl_rows(path: &Path) -> Result<impl Iterator<Item = Result<Row>>> {
    let file = File::open(path).map_err(DataError::io(path))?;
    let path = path.to_path_buf();
    Ok(BufReader::new(file)
        .lines()
        .enumerate()
        .filter_map(move |(i, line)| {
            let line_no = i + 1;
            let line = match line {
                Ok(l) => l,
                Err(e) => return Some(Err(DataError::io(&path)(e))),
            };
            if line.trim().is_empty() {
                return None; // blank lines between records are tolerated
            }
            Some(
                serde_json::from_str::<Value>(&line)
                    .map_err(|e| DataError::Json {
                        path: path.clone(),
                        line: line_no,
                        message: e.to_string(),
                    })
                    .and_then(|value| {
                        if value.is_object() {
                            Ok(Row {
                                location: Location::Line(line_no),
                                value,
                            })
                        } else {
                            Err(DataError::Json {
                                path: path.clone(),
                                line: line_no,
                                message: "expected a JSON object per line".into(),
                            })
                        }
                    }),
            )
        }))
}

fn text_rows(path: &Path, split: TextSplit) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).map_err(DataError::io(path))?;
    let text = text.replace("\r\n", "\n");
    let docs: Vec<String> = match split {
        TextSplit::File => vec![text],
        TextSplit::BlankLine => text
            .split("\n\n")
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(str::to_owned)
            .collect(),
    };
    Ok(docs
        .into_iter()
        .filter(|d| !d.trim().is_empty())
        .enumerate()
        .map(|(i, d)| Row {
            location: Location::Document(i + 1),
            value: serde_json::json!({ "text": d }),
        })
        .collect())
}

fn parquet_rows(path: &Path) -> Result<impl Iterator<Item = Result<Row>>> {
    let bad = |message: String| DataError::Parquet {
        path: path.into(),
        message,
    };
    let file = File::open(path).map_err(DataError::io(path))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| bad(e.to_string()))?
        .with_batch_size(1024)
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let path = path.to_path_buf();
    let mut next_row = 0usize;
    Ok(reader.flat_map(move |batch| -> Vec<Result<Row>> {
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                return vec![Err(DataError::Parquet {
                    path: path.clone(),
                    message: e.to_string(),
                })]
            }
        };
        let columns: StructArray = batch.into();
        let start = next_row;
        next_row += columns.len();
        (0..columns.len())
            .map(|i| {
                let value = struct_row(&columns, i).map_err(|message| DataError::Parquet {
                    path: path.clone(),
                    message: format!("row {}: {message}", start + i),
                })?;
                Ok(Row {
                    location: Location::Row(start + i),
                    value,
                })
            })
            .collect()
    }))
}

fn struct_row(s: &StructArray, i: usize) -> std::result::Result<Value, String> {
    let mut obj = Map::new();
    for (field, col) in s.fields().iter().zip(s.columns()) {
        obj.insert(field.name().clone(), cell(col, i)?);
    }
    Ok(Value::Object(obj))
}

/// One cell of an arrow column as JSON: strings, numbers, booleans, lists and structs (what
/// chat-message columns use). Other types are reported by name.
fn cell(col: &ArrayRef, i: usize) -> std::result::Result<Value, String> {
    if col.is_null(i) {
        return Ok(Value::Null);
    }
    Ok(match col.data_type() {
        DataType::Utf8 => Value::from(col.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => Value::from(col.as_string::<i64>().value(i)),
        DataType::Utf8View => Value::from(col.as_string_view().value(i)),
        DataType::Int32 => Value::from(
            col.as_any()
                .downcast_ref::<Int32Array>()
                .map(|a| a.value(i)),
        ),
        DataType::Int64 => Value::from(
            col.as_any()
                .downcast_ref::<Int64Array>()
                .map(|a| a.value(i)),
        ),
        DataType::Float32 => Value::from(
            col.as_any()
                .downcast_ref::<Float32Array>()
                .map(|a| a.value(i) as f64),
        ),
        DataType::Float64 => Value::from(
            col.as_any()
                .downcast_ref::<Float64Array>()
                .map(|a| a.value(i)),
        ),
        DataType::Boolean => Value::from(
            col.as_any()
                .downcast_ref::<BooleanArray>()
                .map(|a| a.value(i)),
        ),
        DataType::List(_) => list_cell(&col.as_list::<i32>().value(i))?,
        DataType::LargeList(_) => list_cell(&col.as_list::<i64>().value(i))?,
        DataType::Struct(_) => struct_row(col.as_struct(), i)?,
        other => return Err(format!("column type {other} is not supported")),
    })
}

fn list_cell(items: &ArrayRef) -> std::result::Result<Value, String> {
    (0..items.len())
        .map(|j| cell(items, j))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Value::Array)
}
