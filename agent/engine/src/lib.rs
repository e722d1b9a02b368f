//! Weir inference engine.
