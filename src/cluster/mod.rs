//! What several wsgate instances share: a Redis server (`redis`).

pub mod discovery;
pub mod limits;
pub mod redis;
