//! Node behaviour against a real broker (issue 4).
