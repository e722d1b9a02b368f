#!/usr/bin/env bash
# Builds llama.cpp's llama-bench, llama-batched-bench and llama-server from
# the sources vendored in the pinned, hash-checked llama-cpp-python sdist,
# offline apart from the package index, with CMake and Ninja from pip.
# The build (about 25 minutes on 2 cores) is cached outside the checkout:
#   bench/llamacpp/build-llamacpp.sh   # prints the folder of the binaries
# WEIR_BENCH_CACHE overrides the cache folder (default ~/.cache/weir-bench).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${WEIR_BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/weir-bench}
version=$(sed -n 's/^llama-cpp-python==\([0-9.]*\).*/\1/p' "$here/requirements-llamacpp.txt")
out=$cache/llama.cpp-$version
if [ -x "$out/bin/llama-server" ] && [ -x "$out/bin/llama-bench" ] \
    && [ -x "$out/bin/llama-batched-bench" ]; then
  echo "$out/bin"
  exit 0
fi
mkdir -p "$cache"
if [ ! -x "$cache/venv/bin/cmake" ]; then
  python3 -m venv "$cache/venv" >&2
  "$cache/venv/bin/pip" install --quiet --disable-pip-version-check cmake ninja >&2
fi
src=$cache/src-$version
if [ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]; then
  rm -rf "$cache/sdist" "$src"
  # Only this package from source (`:all:` would also refuse wheels of
  # build tools pip pulls in and never finish).
  "$cache/venv/bin/pip" download --quiet --disable-pip-version-check --no-deps \
    --no-binary llama-cpp-python --require-hashes \
    -r "$here/requirements-llamacpp.txt" -d "$cache/sdist" >&2
  mkdir -p "$src"
  tar -xzf "$cache"/sdist/llama_cpp_python-"$version".tar.gz -C "$src" --strip-components=1
fi
# Native code for this CPU (as llama.cpp's own builds do), no OpenSSL, no
# downloads; only the three tools.
"$cache/venv/bin/cmake" -S "$src/vendor/llama.cpp" -B "$cache/build-$version" -G Ninja \
  -DCMAKE_MAKE_PROGRAM="$cache/venv/bin/ninja" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >&2
"$cache/venv/bin/cmake" --build "$cache/build-$version" -j "$(nproc)" \
  --target llama-bench llama-batched-bench llama-server >&2
mkdir -p "$out/bin"
cp "$cache/build-$version"/bin/llama-{bench,batched-bench,server} "$out/bin/"
echo "$out/bin"
