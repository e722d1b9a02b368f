//! weir-agent entry point.
fn main() {}
