//! Node core (placeholder until the node-core helper lands it).
