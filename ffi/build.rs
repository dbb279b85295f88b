//! Gives the shared library its soname on Linux, `libadaspec.so.<major>`, so hosts that link
//! it record the ABI they were built against (scripts/install.sh installs the versioned file
//! and its symlinks).

fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap_or_else(|_| "0".into());
    if os == "linux" {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libadaspec.so.{major}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
