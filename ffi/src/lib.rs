//! libadaspec: the C ABI of the adaspec speculative-generation engine.
//!
//! One module per API area: `status` (status codes, last error, panic boundary), `handles`
//! (opaque handle conversions; the only raw casts), `params` (parameter structs), `model`,
//! `session`, `tokenize`, `version`, `log`. `include/adaspec.h` is generated from these modules by
//! cbindgen (see `ffi/cbindgen.toml`) and committed; a test fails when it drifts.
//!
//! Nothing here may unwind into C: every export runs its body inside [`status::boundary`].
#![allow(non_camel_case_types)]

#[macro_use]
mod status;
mod handles;
mod log;
mod model;
mod params;
mod session;
mod tokenize;
mod version;
