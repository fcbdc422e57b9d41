//! Logging to stderr, one line per event, each starting `ksocks: `.
//!
//! Levels: `-q` silences everything but fatal start-up errors (printed by `main`),
//! the default shows errors and start-up lines, `-v` adds one line per connection close,
//! `-vv` adds data-plane transitions (fallbacks, pauses).

use std::sync::atomic::{AtomicI8, Ordering};

static LEVEL: AtomicI8 = AtomicI8::new(0);

pub const QUIET: i8 = -1;
pub const DEFAULT: i8 = 0;
pub const VERBOSE: i8 = 1;
pub const DEBUG: i8 = 2;

pub fn set_level(level: i8) {
    LEVEL.store(level, Ordering::Relaxed);
}

pub fn enabled(level: i8) -> bool {
    LEVEL.load(Ordering::Relaxed) >= level
}

/// Writes one line; a failed write to stderr is ignored (there is nowhere else to report it).
pub fn write(args: std::fmt::Arguments) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "ksocks: {args}");
}

/// Errors and start-up lines: shown unless `-q`.
#[macro_export]
macro_rules! error {
    ($($t:tt)*) => { if $crate::log::enabled($crate::log::DEFAULT) { $crate::log::write(format_args!($($t)*)) } };
}

/// Per-connection lines: shown with `-v`.
#[macro_export]
macro_rules! info {
    ($($t:tt)*) => { if $crate::log::enabled($crate::log::VERBOSE) { $crate::log::write(format_args!($($t)*)) } };
}

/// Data-plane transitions: shown with `-vv`.
#[macro_export]
macro_rules! debug {
    ($($t:tt)*) => { if $crate::log::enabled($crate::log::DEBUG) { $crate::log::write(format_args!($($t)*)) } };
}
