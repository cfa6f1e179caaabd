//! Holds no code: the tests are the `[[test]]` targets beside this crate's Cargo.toml.
