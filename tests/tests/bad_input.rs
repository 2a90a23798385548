//! Issue 7 item 4: bad input (placeholder while the module is written).
