//! Cross-crate tests with real processes live in `tests/`.
