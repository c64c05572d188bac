//! Handlers (being written).
