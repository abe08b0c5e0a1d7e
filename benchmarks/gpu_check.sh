#!/usr/bin/env bash
# The GPU check (issue #15), in one call on a CUDA machine: install planc without
# dependencies (the machine is offline; its image has torch and Triton), run the GPU
# kernel tests, then the Triton table (benchmarks/gpu_table.py). Everything lands in
# $OUT (default runs/gpu_check): tests.log, gpu_table.md, gpu_table.json, env.txt.
#
# planc's plan loader needs jsonschema, which that image lacks: carry it as wheels in
# .whl/ (ignored by git; see /work/.library/device/README.md, "Notes"), e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 -d .whl \
#     jsonschema jsonschema-specifications referencing rpds-py
# and call it with carry [".whl"]. Budget: under 8 minutes on an H200.
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/planc-deps .whl/*.whl && \
    export PYTHONPATH=/tmp/planc-deps${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1 || {
  echo "gpu_check: installing planc failed (see $OUT/install.log)"; tail -5 "$OUT/install.log"; exit 1; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels_triton.py 2>&1 | tee "$OUT/tests.log" | tail -5
timeout 300 python3 benchmarks/gpu_table.py "$OUT" 20 2>&1 | tail -20
