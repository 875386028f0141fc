//! kiln CLI
