#!/usr/bin/env bash
# The GPU half of the benchmark, in phases of a few minutes each, from the checkout's root with the
# project installed (make setup; without a package index: the offline wheel bundle in
# docs/benchmarks.md, "GPU"). Times are on one H100-class GPU with 16 CPU cores:
#
#   bash scripts/gpu_check.sh seed      # <= 7 min: CUDA decode tests; train the seed preset; in-process stages
#   bash scripts/gpu_check.sh served    # <= 7 min: served (batchSize 32, 1 and 2 workers) + null handler
#   bash scripts/gpu_check.sh d0        # <= 8 min: efficientdet_d0, every stage
#   bash scripts/gpu_check.sh formats   # <= 9 min: d0 in TorchScript, AOTInductor (CUDA fp16) and ONNX Runtime
#   bash scripts/gpu_check.sh photos    # <= 8 min: photo sizes (640x480, 1080p, 12 MP): nvjpeg vs PIL reduced, served
#
# "served" reuses the seed model trained by "seed" (kept in $WORK) and trains it again otherwise.
# Every step runs under `timeout` and leaves its log and JSON under $OUT (default ./gpu-out) even
# when it fails or times out. Big files (checkpoints, exports, .mar) stay in $WORK. A step that
# fails does not stop the ones after it; the script's status is the number of failed steps. The
# JSON files are named after the GPU (e.g. h100-seed-fp16-inproc.json): commit them under
# docs/results/ and the figures go into docs/benchmarks.md.
set -u
PHASE=${1:-seed}
OUT=${OUT:-$PWD/gpu-out}
WORK=${WORK:-/tmp/effdet-gpu}
PY=${PY:-python3}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
failed=0
T0=$(date +%s)

step() {  # step NAME SECONDS CMD...: run under timeout, log to $OUT/NAME.log, record status and time
  local name=$1 limit=$2
  shift 2
  local t=$(date +%s)
  echo "== $name (limit ${limit}s, at +$((t - T0))s)" | tee -a "$OUT/steps.txt"
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "   $name: rc=$rc in $(( $(date +%s) - t ))s" | tee -a "$OUT/steps.txt"
  tail -n 25 "$OUT/$name.log"
  [ $rc -eq 0 ] || failed=$((failed + 1))
  return 0
}

keep() {  # copy the bench's JSON/PNG (not the models) to $OUT under a name saying device, model, precision
  local from=$1 name=$2
  [ -f "$from/latest.json" ] && cp "$from/latest.json" "$OUT/$name.json"
  [ -f "$from/latest.png" ] && cp "$from/latest.png" "$OUT/$name.png"
  find "$from" -maxdepth 2 -name model.json -path "*trained*" -exec cp {} "$OUT/$name.train-model.json" \; 2>/dev/null
  return 0
}

GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | grep -oiE '[a-z][0-9]{2,4}' | head -n 1 | tr 'A-Z' 'a-z')
GPU=${GPU:-gpu}
step env 45 bash -c "nvidia-smi; $PY -c 'import torch, torchvision, ts, effdet; print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name(0))'; which torchserve torch-model-archiver java"

BENCH=("$PY" -m scripts.bench --device cuda --no-progress --threads 8 --images 64)
case "$PHASE" in
seed)
  # the CUDA tests of the nvjpeg path (single and batched decode)
  step cuda-tests 60 "$PY" -m pytest -q -p no:cacheprovider --basetemp=/tmp/pt-gpu tests/test_decode.py -k cuda
  # train the seed preset on the GPU for 250 steps (mixed precision), export it, then the in-process stages on the
  # trained model: ceiling fp16 + channels_last, effdet, post-processing as served, handler, fp16 vs fp32.
  # The training speed is in seed.train-model.json (provenance: steps, train_seconds).
  step seed-inproc 330 "${BENCH[@]}" --model seed --train-steps 250 --train-batch-size 8 \
    --train-precision 16-mixed --precision fp16 --channels-last --stages model,effdet,post,handler,fp16 \
    --batches 1,8,32 --repeats 5 --out "$WORK/seed"
  keep "$WORK/seed" $GPU-seed-fp16-inproc
  ;;
served)
  # served over HTTP (batchSize 32, one and two GPU workers) and the null handler at the same settings
  step seed-served 420 "${BENCH[@]}" --model seed --train-steps 250 --train-batch-size 8 \
    --train-precision 16-mixed --precision fp16 --channels-last --stages model,served,null --batches 32 \
    --repeats 3 --configs 32:10:1,32:10:2 --null-configs 32:10:2 --concurrency 64 --requests 512 \
    --served-repeats 1 --out "$WORK/seed"
  keep "$WORK/seed" $GPU-seed-fp16-served
  ;;
d0)
  step d0-all 480 "${BENCH[@]}" --model efficientdet_d0 --image-size 512 --train-steps 200 \
    --train-batch-size 16 --train-precision 16-mixed --precision fp16 --channels-last \
    --stages model,effdet,post,handler,fp16,served,null --batches 1,8,32 --repeats 5 \
    --configs 32:10:1,32:10:2 --null-configs 32:10:2 --concurrency 64 --requests 512 --served-repeats 1 \
    --out "$WORK/d0"
  keep "$WORK/d0" $GPU-d0-fp16-all
  ;;
formats)
  # d0 in the three network formats side by side: the AOTInductor package compiled here for CUDA fp16 from the
  # trained checkpoint (export refuses a package outside its parity tolerance) and the ONNX file (ONNX Runtime's
  # CUDA provider: onnxruntime-gpu), then model-only, handler and served
  step d0-formats 540 "${BENCH[@]}" --model efficientdet_d0 --image-size 512 --train-steps 100 \
    --train-batch-size 16 --train-precision 16-mixed --precision fp16 --channels-last --formats torchscript,aoti,onnx \
    --stages model,handler,served --batches 1,8,32 --repeats 5 --configs 32:10:1 --concurrency 64 \
    --requests 256 --served-repeats 1 --out "$WORK/d0"
  keep "$WORK/d0" $GPU-d0-fp16-formats
  ;;
photos)
  # photos at camera sizes (640x480, 1080p, 12 MP) on the seed model: the CUDA tests of the photo path, then
  # the handler per size with nvjpeg (whole JPEG decoded on the device, resized there) and with --decode cpu
  # (PIL's DCT-reduced decode on the host, a small upload), then served per size and a worker's memory
  step cuda-photo-tests 120 "$PY" -m pytest -q -p no:cacheprovider --basetemp=/tmp/pt-gpu tests/test_photos.py -k cuda
  PHOTOS=(--model seed --train-steps 250 --train-batch-size 8 --train-precision 16-mixed --precision fp16
    --channels-last --batches 1,8 --repeats 5 --images 16 --image-sizes 640x480,1920x1080,4032x3024)
  step seed-photos 330 "${BENCH[@]}" "${PHOTOS[@]}" --stages photos,photos_served --photo-config 32:10:1 \
    --photo-concurrency 64 --requests 256 --served-repeats 1 --out "$WORK/seed"
  keep "$WORK/seed" $GPU-seed-fp16-photos-nvjpeg
  step seed-photos-pil 120 "${BENCH[@]}" "${PHOTOS[@]}" --stages photos --decode cpu --out "$WORK/seed"
  keep "$WORK/seed" $GPU-seed-fp16-photos-pil
  ;;
*)
  echo "unknown phase $PHASE (seed, served, d0, formats or photos)" >&2
  exit 2
  ;;
esac
echo "total $(( $(date +%s) - T0 ))s, failed steps: $failed" | tee -a "$OUT/steps.txt"
exit "$failed"
