//! weir-operator entry point.
fn main() {}
