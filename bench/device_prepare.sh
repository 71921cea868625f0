#!/usr/bin/env bash
# Fetch, where PyPI is reachable, the wheels of what psdclip needs and the GPU machine lacks (it reaches no registry):
# Python 3.12, manylinux x86-64, the versions installed here (the ones the tests ran with), no torch. Into bench/wheels/
# (git-ignored), with the requirements.txt that bench/device_check.sh installs from it.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
out=bench/wheels
limit_mib=16 # the device tool carries at most 64 MiB of working tree in all
# the GPU machine has torch, torchvision, lightning, timm, huggingface-hub, safetensors, regex, tqdm, pyyaml, numpy,
# pandas, pyarrow, scikit-learn, matplotlib, tensorboard, rich (its KINDS.md list); these it lacks
packages=(open_clip_torch ftfy wcwidth webdataset braceexpand hydra-core omegaconf antlr4-python3-runtime)
# sdist-only on PyPI, pure Python: built into a wheel here
build_here=(antlr4-python3-runtime)
# carried but not asked for: pip takes them only where the machine's own copy is too old (open_clip needs timm>=1.0.17)
fallbacks=(timm)

rm -rf "$out"
mkdir -p "$out"
for name in "${packages[@]}"; do
  version=$("$python" -c "from importlib.metadata import version; print(version('$name'))")
  echo "$name==$version" >>"$out/requirements.txt"
done
download=()
for name in "${packages[@]}"; do
  if [[ " ${build_here[*]} " != *" $name "* ]]; then download+=("$(grep -i "^$name==" "$out/requirements.txt")"); fi
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$out" "${download[@]}"
for name in "${fallbacks[@]}"; do
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform any -d "$out" "$name==$("$python" -c "from importlib.metadata import version; print(version('$name'))")"
done
for name in "${build_here[@]}"; do
  "$python" -m pip wheel -q --no-deps -w "$out" "$(grep -i "^$name==" "$out/requirements.txt")"
done

size_mib=$(du -sm "$out" | cut -f1)
echo "$(find "$out" -name '*.whl' | wc -l) wheels, ${size_mib} MiB in $out:"
sed 's/^/  /' "$out/requirements.txt"
if ((size_mib > limit_mib)); then
  echo "$out is larger than $limit_mib MiB: too much to carry to the device" >&2
  exit 1
fi
