#!/usr/bin/env bash
# GPU check, one call, under 10 minutes on one GPU with torch and timm:
# 1. the GPU smoke tests (`pytest -m gpu tests/gpu`, about 1 minute): resnet18 trains 2 epochs in bf16,
#    NVML joins the training process to its run, and with 2 GPUs 2-rank NCCL DDP equals one rank;
#    their summary goes to gpu-smoke.log;
# 2. images/s, MFU and NVML utilisation for resnet50 and convnext_tiny at 224 px, bf16 + channels_last,
#    compile off/on, each beside the synthetic and the plain-loop reference;
# 3. predict per backend at 224 px against its forward alone.
# Files go to the folder in $1: gpu_check.tgz (every log and JSON) and summary.txt (the tail of each).
#   bash bench/gpu_check.sh "$OUT"
# pydantic (for params) may be missing on a GPU image: wheels in .whl/ are installed if so (pydantic,
# pydantic-core, annotated-types, typing-inspection; see /work/.library/device/README.md).
set -uo pipefail
back=${1:?usage: bench/gpu_check.sh OUTPUT_DIR}
mkdir -p "$back"
out=$(mktemp -d)  # every file here; what comes back (8 files at most) is one archive of them and a summary
trap 'tar czf "$back/gpu_check.tgz" -C "$out" . ; for f in "$out"/*; do echo "== ${f##*/}"; tail -n 8 "$f"; done > "$back/summary.txt"' EXIT
cd "$(dirname "$0")/.."
if ! python3 -c "import pydantic, yaml" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" 2>&1
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee "$out/versions.txt"
# a hang guard of 300 s: the two tests take about a minute together
timeout 300 python3 -m pytest -m gpu tests/gpu -q -rA -p no:cacheprovider > "$out/gpu-smoke.log" 2>&1 \
  || echo "gpu smoke tests: failed or timed out (see gpu-smoke.log)" | tee -a "$out/failures.txt"
tail -n 4 "$out/gpu-smoke.log"
for model in resnet50 convnext_tiny; do
  for compile in "" "--compile"; do
    name="$model${compile:+-compile}"
    timeout 150 python3 bench/train_throughput.py --model "$model" --size 224 --batch 128 --images 2048 \
      --rounds 2 --precision bf16 --workers 8 $compile --json-out "$out/$name.json" > "$out/$name.log" 2>&1 \
      || echo "$name: failed or timed out (see $name.log)" | tee -a "$out/failures.txt"
    tail -n 1 "$out/$name.log"
  done
done
# 3. predict img/s per backend at 224 px against each backend's forward alone (torch on the GPU; ONNX Runtime on
#    CUDA where onnxruntime-gpu is installed, else the CPU; OpenVINO and int8 on the CPU), where installed
timeout 180 python3 bench/predict_throughput.py --device cuda --size 224 --batch 128 --images 1024 --rounds 3 \
  --workers 8 --backends torch,onnx,openvino,openvino-int8 > "$out/predict.log" 2>&1 \
  || echo "predict: failed or timed out (see predict.log)" | tee -a "$out/failures.txt"
tail -n 6 "$out/predict.log"
