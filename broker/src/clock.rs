//! Time source (placeholder until the store helper lands it).
