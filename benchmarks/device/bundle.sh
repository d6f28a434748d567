#!/bin/bash
# Build the bundle the GPU check needs on a bare, offline GPU machine (the `device` tool's H200 image:
# torch + CUDA, no ComfyUI, no comfy-kitchen, no PyAV). Run from the repo root, here, with pip access:
#     bash benchmarks/device/bundle.sh            # writes .gpu/ (git-ignored via .git/info/exclude)
# then on the device, carrying .gpu:  bash benchmarks/device/run.sh [full|lora|comfy]
# Size: ~28 MB (the 64 MiB carry limit rules out kitchen's HIP backend and PyAV: the first is dropped,
# the second replaced by an import-only stand-in, since the check never reads or writes video).
set -euo pipefail
SHARED=${SHARED:-../shared}
KITCHEN=${KITCHEN:-comfy-kitchen==0.2.31}   # ComfyUI 0.33.0's pin
AIMDO=${AIMDO:-comfy-aimdo==0.4.13}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl .gpu/avstub/av
cp "$SHARED/comfyui/ComfyUI-0.33.0.tar.gz" .gpu/
cp -r "$SHARED/comfyui/stubs" .gpu/stubs
plat=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64)
python3 -m pip download -q "${plat[@]}" -d .gpu/whl "$AIMDO"
tmp=$(mktemp -d)
python3 -m pip download -q "${plat[@]}" -d "$tmp" "$KITCHEN"
(cd "$tmp" && unzip -q ./*.whl && rm -rf ./*.whl comfy_kitchen/backends/hip && tar -cJf - .) > .gpu/kitchen.tar.xz
rm -rf "$tmp"
for f in __init__ container error filter subtitles/__init__ subtitles/stream video/__init__ video/reformatter \
         audio/__init__ audio/resampler; do
    mkdir -p "$(dirname ".gpu/avstub/av/$f")"
    cat > ".gpu/avstub/av/$f.py" <<'PY'
"""Import-only stand-in for PyAV on the GPU machine: the GPU check never reads or writes video."""


class _Anything(type):
    def __getattr__(cls, name):
        return _Anything(name, (Exception,), {})


def __getattr__(name):
    return _Anything(name, (Exception,), {})
PY
done
du -sh .gpu
