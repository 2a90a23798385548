//! Storage interface (placeholder until the store helper lands it).
