//! Vector index (placeholder: being written).
