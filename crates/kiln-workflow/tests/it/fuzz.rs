//! parse_workflow never panics.
