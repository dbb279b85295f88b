#!/usr/bin/env bash
# Installs the C ABI plugin under a prefix:
#   PREFIX/lib/libadaspec.so.X.Y.Z (soname libadaspec.so.X) with the symlinks
#   libadaspec.so -> libadaspec.so.X -> libadaspec.so.X.Y.Z, PREFIX/lib/libadaspec.a,
#   PREFIX/include/adaspec.h, PREFIX/lib/pkgconfig/adaspec.pc
# so that hosts build with `pkg-config --cflags --libs adaspec` (add --static for the .a).
#
# usage: scripts/install.sh [--prefix DIR] [--no-build] [--target-dir DIR]
#   --prefix DIR      install prefix (default: $PREFIX, else /usr/local)
#   --no-build        do not run cargo; install what target/release already holds
#   --target-dir DIR  cargo target directory holding release/ (default: $CARGO_TARGET_DIR, else target)
# Then, e.g.:
#   export PKG_CONFIG_PATH=DIR/lib/pkgconfig
#   cc -std=c99 examples/c/host_dlopen.c $(pkg-config --cflags --libs adaspec) -ldl -o host_dlopen
set -euo pipefail
cd "$(dirname "$0")/.."

prefix="${PREFIX:-/usr/local}"
build=1
target_dir="${CARGO_TARGET_DIR:-target}"
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
        --prefix=*) prefix="${1#--prefix=}"; shift ;;
        --no-build) build=0; shift ;;
        --target-dir) target_dir="${2:?--target-dir needs a directory}"; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ "$build" = 1 ]; then
    cargo build --release -p adaspec-ffi --target-dir "$target_dir"
fi
release="$target_dir/release"
for f in libadaspec.so libadaspec.a; do
    if [ ! -f "$release/$f" ]; then
        echo "install.sh: $release/$f not found; build with: cargo build --release -p adaspec-ffi" >&2
        exit 1
    fi
done

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
prefix="$(mkdir -p "$prefix" && cd "$prefix" && pwd)"
install -d "$prefix/lib/pkgconfig" "$prefix/include"
major="${version%%.*}"
install -m 0755 "$release/libadaspec.so" "$prefix/lib/libadaspec.so.$version"
ln -sfn "libadaspec.so.$version" "$prefix/lib/libadaspec.so.$major"
ln -sfn "libadaspec.so.$major" "$prefix/lib/libadaspec.so"
install -m 0644 "$release/libadaspec.a" "$prefix/lib/libadaspec.a"
install -m 0644 include/adaspec.h "$prefix/include/adaspec.h"
# Libs.private: what the static library needs (rustc --print native-static-libs; llama.cpp
# brings OpenMP and the C++ runtime).
cat > "$prefix/lib/pkgconfig/adaspec.pc" <<EOF
prefix=$prefix
exec_prefix=\${prefix}
libdir=\${exec_prefix}/lib
includedir=\${prefix}/include

Name: adaspec
Description: Lossless speculative generation with draft trees on llama.cpp (C ABI)
Version: $version
Libs: -L\${libdir} -ladaspec
Libs.private: -lgomp -lstdc++ -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
Cflags: -I\${includedir}
EOF
echo "installed libadaspec $version under $prefix"
echo "  export PKG_CONFIG_PATH=$prefix/lib/pkgconfig   # then: pkg-config --cflags --libs adaspec"
