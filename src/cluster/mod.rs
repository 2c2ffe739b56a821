//! What several wsgate instances share: a Redis server (`redis`).

pub mod redis;
