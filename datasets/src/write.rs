//! Writing small tables to parquet (what `prepare-demo` produces and what tests use as real
//! fixtures): string, number and chat-message columns.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, ListArray, StringArray, StructArray};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Fields as ArrowFields};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::error::{DataError, Result};
use crate::records::{Message, Role};

pub enum Column {
    Str(Vec<String>),
    F64(Vec<f64>),
    /// `list<struct<role: string, content: string>>`, the messages layout of chat datasets.
    Messages(Vec<Vec<Message>>),
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

fn to_array(col: &Column) -> ArrayRef {
    match col {
        Column::Str(v) => Arc::new(StringArray::from_iter_values(v)),
        Column::F64(v) => Arc::new(Float64Array::from(v.clone())),
        Column::Messages(rows) => {
            let flat: Vec<&Message> = rows.iter().flatten().collect();
            let fields = ArrowFields::from(vec![
                Field::new("role", DataType::Utf8, false),
                Field::new("content", DataType::Utf8, false),
            ]);
            let roles: ArrayRef = Arc::new(StringArray::from_iter_values(
                flat.iter().map(|m| role_name(m.role)),
            ));
            let contents: ArrayRef = Arc::new(StringArray::from_iter_values(
                flat.iter().map(|m| m.content.as_str()),
            ));
            let items = StructArray::new(fields.clone(), vec![roles, contents], None);
            let offsets = OffsetBuffer::from_lengths(rows.iter().map(Vec::len));
            let item_field = Arc::new(Field::new("item", DataType::Struct(fields), false));
            Arc::new(ListArray::new(item_field, offsets, Arc::new(items), None))
        }
    }
}

/// Writes `columns` (all of one length) to `path` as one parquet file, atomically.
pub fn write_parquet(path: &Path, columns: &[(&str, Column)]) -> Result<()> {
    let arrays: Vec<(String, ArrayRef)> = columns
        .iter()
        .map(|(n, c)| (n.to_string(), to_array(c)))
        .collect();
    let batch = RecordBatch::try_from_iter(arrays).map_err(|e| DataError::Parquet {
        path: path.into(),
        message: e.to_string(),
    })?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(DataError::io(parent))?;
    }
    let tmp = path.with_extension("parquet.tmp");
    let file = std::fs::File::create(&tmp).map_err(DataError::io(&tmp))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let bad = |e: parquet::errors::ParquetError| DataError::Parquet {
        path: path.into(),
        message: e.to_string(),
    };
    let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props)).map_err(bad)?;
    writer.write(&batch).map_err(bad)?;
    writer.close().map_err(bad)?;
    std::fs::rename(&tmp, path).map_err(DataError::io(path))
}
