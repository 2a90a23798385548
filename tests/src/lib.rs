//! trmx-tests: shared harness for end-to-end tests (filled in by the node helper and the lead).
