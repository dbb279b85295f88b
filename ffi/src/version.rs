//! Library version and ABI version. The header's `ADASPEC_VERSION` macro comes from
//! `after_includes` in ffi/cbindgen.toml (cbindgen cannot export string constants); tests check
//! that Cargo.toml, that macro and `adaspec_version()` agree.

use std::ffi::c_char;

use crate::params::ADASPEC_ABI_VERSION;
use crate::status::boundary_value;

/// NUL-terminated crate version, e.g. "0.1.0".
const VERSION_C: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");

/// The library version as a static NUL-terminated string (the `ADASPEC_VERSION` the library
/// was built as, e.g. "0.1.0"). Never NULL.
#[no_mangle]
pub extern "C" fn adaspec_version() -> *const c_char {
    boundary_value("adaspec_version", VERSION_C.as_ptr() as *const c_char, || VERSION_C.as_ptr() as *const c_char)
}

/// The ABI version of the library. A host compiled against this header should check
/// `adaspec_abi_version() == ADASPEC_ABI_VERSION` before calling anything else.
#[no_mangle]
pub extern "C" fn adaspec_abi_version() -> u32 {
    boundary_value("adaspec_abi_version", ADASPEC_ABI_VERSION, || ADASPEC_ABI_VERSION)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_the_crate_version() {
        // SAFETY: static NUL-terminated string.
        let v = unsafe { std::ffi::CStr::from_ptr(adaspec_version()) };
        assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
        assert_eq!(adaspec_abi_version(), 1);
    }
}
