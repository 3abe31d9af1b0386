//! The atomic types of table memory: a table's entries ([`TableRef::entries`]) and its
//! metadata ([`TableMeta`]).
//!
//! They are `core`'s, except with the `loom` feature, which swaps in `loom`'s so that the model
//! checker explores the interleavings of the engine's own code over table memory
//! (`checkers/tests/loom_engine.rs`). The feature is for those tests only: loom's atomics
//! work inside `loom::model` and nowhere else. Allocators that build table pages
//! ([`TableAlloc`]) must use these types.
//!
//! [`TableRef::entries`]: crate::TableRef::entries
//! [`TableMeta`]: crate::TableMeta
//! [`TableAlloc`]: crate::TableAlloc

#[cfg(feature = "loom")]
pub use loom::sync::atomic::{AtomicU32, AtomicU64};

#[cfg(not(feature = "loom"))]
pub use core::sync::atomic::{AtomicU32, AtomicU64};
