//! Virtual keys and usage, in SQLite.
