//! junction-cli
