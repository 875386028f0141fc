//! Bad input gives exact `file:line:col` messages.
