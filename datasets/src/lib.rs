//! temper-data: readers, tokenizers, chat template and batches (no tch). Built by the datasets issue.
