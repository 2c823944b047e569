//! helpers for the whole-daemon tests
