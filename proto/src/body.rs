//! Message bodies: validation of the DOMAIN.md rules and the proto3 JSON mapping.
