//! Internals of the `snakepit` binary reachable from outside only for its fuzz targets (`fuzz/`)
//! and their corpus replay test. Not an API: everything here is `#[doc(hidden)]`.

#![deny(unsafe_code)]

#[doc(hidden)]
pub mod fuzzing;
