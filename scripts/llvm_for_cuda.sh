#!/usr/bin/env bash
# Lets `cargo build --features cuda` link offline. burn 0.22's CUDA runtime (cubecl-cuda) links
# LLVM statically (its default kernel compiler is LLVM's NVPTX back end), and the build script of
# tracel-llvm-bundler downloads an LLVM 23 bundle from GitHub, which fails without internet. This
# installs Debian's LLVM 22 (package registries work) and presents it where the bundler looks
# (~/.local/share/tracel/tracel-llvm-23.1.0-4, with the bundler's "installed" marker), behind an
# llvm-config that names z3 as a library (the bundler turns Debian's `/usr/lib/.../libz3.so` into
# `-llibz3`). LLVM 22 is one major version older than the bundle: the build links, and whether
# its PTX runs has to be checked on a GPU (docs/gpu.md).
set -euo pipefail
llvm=/usr/lib/llvm-22
if [ ! -x "$llvm/bin/llvm-config" ] || [ ! -e "$llvm/lib/libPolly.a" ] \
    || [ ! -e /usr/lib/x86_64-linux-gnu/libzstd.so ]; then
    sudo=$([ "$(id -u)" = 0 ] || echo sudo)
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q \
        llvm-22-dev libpolly-22-dev libzstd-dev
fi
bundle=${XDG_DATA_HOME:-$HOME/.local/share}/tracel/tracel-llvm-23.1.0-4
mkdir -p "$bundle/bin"
ln -sfn "$llvm/lib" "$bundle/lib"
ln -sfn "$llvm/include" "$bundle/include"
cat > "$bundle/bin/llvm-config" <<EOS
#!/bin/sh
$llvm/bin/llvm-config "\$@" | sed 's|[^ ]*/libz3\.so|-lz3|g'
EOS
chmod +x "$bundle/bin/llvm-config"
touch "$bundle/.tracel-llvm-installed"
echo "LLVM $("$bundle/bin/llvm-config" --version) stands in for tracel's bundle at $bundle"
