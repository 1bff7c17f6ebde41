#!/usr/bin/env bash
# Issue 18's measurements on one lent GPU in one call: the parts below, most valuable first, each writing its JSON
# into $OUT as it measures (a part stopped by its time limit keeps what it had), then the summary line, last
# (also at the end of session.log).
#
#   bash benchmarks/gpu_session.sh                          # on the GPU machine, from the repo root
#   TINY=1 OUT=/tmp/session bash benchmarks/gpu_session.sh  # the same path on the CPU with the tiny shapes
#
# Nothing is fetched: diffusers comes from the wheel carried in .whl/ (unpacked into /tmp/site when python3 lacks
# it), everything else is the machine's own python3. Settings (environment):
#   OUT       where results go (default /tmp/lora-studio-session-out); files: sd15_b8.json sd15_b1.json sd15_gen.json
#             sdxl_b1.json sdxl_b4.json sd15_compile.json sd15_compile_warm.json train_compile.json session.log
#             (and, for the parts not in the default PARTS: sd15_b8_cl.json sd15_b8_warm.json gen_decoder.json sdxl_b4_compile.json
#             gen_background.json train_sdpa.json train_kernels.json train_cl.json train_models.json sd15_b8_plain_cmp.json
#             sd15_b8_cl_cmp.json sd15_b8_models.json gen_both.json gen_profile_sdxl.json)
#             (8 files at most come back from a lent machine: name fewer PARTS there)
#   BUDGET_S  seconds for all parts (default 450); a part gets at most what is left (less a reserve for the
#             summary) and its own cap, and is skipped when less than its minimum is left
#   PARTS     which parts, in this order (default: sd15_b8 sd15_b1 sd15_gen sdxl_b1 sdxl_b4 sd15_compile
#             sd15_compile_warm train_compile)
#   TORCHINDUCTOR_CACHE_DIR  where torch.compile keeps what it compiled (default $WORK/torchinductor, so that the
#             first sd15_compile compiles from nothing and sd15_compile_warm reuses it)
#   TINY=1    tiny shapes on the CPU, few steps, no torch.compile (TINY_COMPILE=1 compiles anyway)
#   WORK      models, data and runs (default /tmp/lora-studio-session)
#
# The parts, in the default order, with the minutes each is estimated to take on an H200 (estimates from the H100
# runs of 2026-11-24 and issue 18's reference figures, not measurements; model building and loading included).
# Measured on one H100 on 2026-12-07 (h100_gpu_session_2026-12-07.log), each part's whole time: sd15_b8 3.7 min,
# sd15_b1 0.8, sd15_b8_cl_cmp 3.7 (its compile cache filled by sd15_b8), gen_both 4.6, sd15_compile 2.1 (cache
# filled), sd15_gen 0.7.
#   sd15_b8       ~2.7  SD 1.5 training at batch 8 with --torch-compile on (about 97 s of compiling first; 157 s on
#                       2026-12-07) and --channels-last auto (on for this compiled step since 2026-12-07), ours
#                       and the diffusers example script's step -> sd15_bs8_mfu, speedup_bs8
#   sd15_b1       ~0.8  the same at batch 1 -> speedup_bs1
#   sd15_gen      ~0.8  generation with no adapter, one and two unfused, one fused; a strength change, a cold load;
#                       diffusers' pipeline with the adapter fused -> gen_512_30_s, unfused_overhead,
#                       fused_overhead, scale_change_ms, cold_load_s
#   sdxl_b1       ~1.8  SDXL training at batch 1 held to an 8 GB card (--gpu-memory 8: the plan turns on what it
#                       needs; the SDXL model is built and saved here first), 30-step generation
#                       -> sdxl_bs1_peak_gib, sdxl_bs1_img_s, gen_sdxl_1024_30_s
#   sdxl_b4       ~1.2  SDXL training at batch 4, ours and the SDXL example script's step -> sdxl_bs4_mfu
#   sd15_compile  ~3.5  ours with one adapter again, ours with the whole UNet through torch.compile inside the
#                       generation graph (the first picture compiles), then diffusers' fused pipeline with its UNet
#                       through torch.compile (the compiles ~2 of it) -> gen_vs_compiled_diffusers
#   sd15_compile_warm ~1  ours compiled again in a new process: the first picture from the compile cache
#   sd15_b8_cl    ~2.5  sd15_b8 through the trainer with --channels-last on, without the script's step (not in the
#                       default PARTS)
#   sd15_b8_warm  ~1.5  sd15_b8 again in a new process, the compile cache filled by it: how long a second compiled
#                       run takes to its first step (not in the default PARTS)
#   gen_decoder   ~3    benchmarks/gen_profile.py --compile --no-levers: the VAE decoder's decode compiled and not,
#                       and a whole picture from a compiled studio (not in the default PARTS)
#   gen_background ~2.5 ours compiling in the background (the page's way on a GPU): the first picture, pictures
#                       while the worker compiles, how long it takes, then compiled pictures (not in the default
#                       PARTS; first in a call, so that the compile cache holds no SD 1.5 generation code yet)
#   gen_both      ~4    gen_background, then the foreground compile (--studio-compile) in the same process: the
#                       page's background-compiled picture against `--compile`'s on one machine (not in the
#                       default PARTS)
#   sdxl_b4_compile ~4  sdxl_b4 with --torch-compile on (SDXL's compiled training step is not measured; not in the
#                       default PARTS)
#   train_sdpa    ~1    the graphed training step (batch 1 and 8) with each attention kernel forced: flash,
#                       efficient, cudnn (benchmarks/compile_probe.py --sdpa --no-compile; not in the default PARTS)
#   train_kernels ~3    the batch-8 training step's GPU time by kernel kind (eager and compiled), and the whole UNet
#                       compiled as one module (not regional) inside the graph (compile_probe.py --kernels --blocks
#                       unet; not in the default PARTS)
#   train_cl      ~3    the regional compile at batch 8 with the UNet and latents channels_last, kernels profiled
#                       (not in the default PARTS)
#   sd15_b8_plain_cmp ~3  sd15_b8 through the trainer with --torch-compile on --channels-last off --compare-graphs (the
#                       compiled adapter's distance from eager, then the speed), without the script's step (not in
#                       the default PARTS; estimate not measured; with the next part, give BUDGET_S=560)
#   sd15_b8_cl_cmp ~3   the same with --channels-last on: run after sd15_b8_plain_cmp, the two layouts compared on
#                       one machine (not in the default PARTS)
#   sd15_b8_models ~3.7 sd15_b8 through the trainer with --compile-regions models --compare-graphs (each
#                       Transformer2DModel compiled whole, resnets, down- and upsamplers: the larger regions the trainer
#                       does not compile by default; marked `how`, left out of the summary; not in the default PARTS)
#   train_models  ~2.5  compile_probe.py --blocks models --kernels at batch 8: larger compiled regions (each
#                       Transformer2DModel with its GroupNorm, projections and layout changes; resnets, down- and
#                       upsamplers), kernels profiled (not in the default PARTS)
#   gen_profile_sdxl ~6 benchmarks/gen_profile.py --arch sdxl --compile: where an SDXL picture's time goes (text
#                       encoders, VAE decode, one UNet call at batch 2 under each lever: attention kernels, fused
#                       q/k/v, channels-last, the whole UNet compiled) and a compiled studio's picture (estimate not
#                       measured; not in the default PARTS)
#   train_compile ~4    the training step with the UNet's repeated blocks compiled (regional torch.compile), with
#                       and without a CUDA graph around it, batch 1 and 8: seconds per step, compile time, and the
#                       LoRA gradients' distance from eager's (benchmarks/compile_probe.py; on the CPU in bf16 the
#                       inductor-compiled gradients were wrong: benchmarks/results/compile_probe_cpu.json)
# Last because the compile is the longest and least sure; if the budget stops it, the rest is kept.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/lora-studio-session-out}
WORK=${WORK:-/tmp/lora-studio-session}
BUDGET_S=${BUDGET_S:-450}
RESERVE_S=${RESERVE_S:-25}
PARTS=${PARTS:-sd15_b8 sd15_b1 sd15_gen sdxl_b1 sdxl_b4 sd15_compile sd15_compile_warm train_compile}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
LOG=$OUT/session.log
START=$(date +%s)
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$WORK/torchinductor}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
export TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false

if ! "$PY" -c "import diffusers" 2>/dev/null; then
    if ! ls .whl/diffusers-*.whl >/dev/null 2>&1; then
        echo "gpu_session: $PY has no diffusers and .whl/ holds no diffusers wheel; carry .whl (see the README's Benchmarks)"
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 2
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ "${TINY:-0}" = 1 ]; then
    SIZE=(--tiny --device cpu)
    SD15_STEPS=14 SDXL_STEPS=14 SCALE=0
    SD15_REF=(--reference-warmup 1 --reference-steps 2)
    SDXL_REF=(--reference-warmup 1 --reference-steps 2)
    COMPILE=() TRAIN_COMPILE=(--tiny --backend aot_eager --batches 2 --repeat 2) SD15_B8=() GEN_COMPILE=()
    TRAIN_SDPA=(--tiny --batches 2 --repeat 2)
    TRAIN_KERNELS=(--tiny --backend aot_eager --batches 2 --repeat 2)
    [ "${TINY_COMPILE:-0}" = 1 ] && COMPILE=(--diffusers-compile --studio-compile)
    SUMMARY_FLAGS=(--allow-tiny --allow-cpu)
else
    SIZE=()
    SD15_STEPS=32 SDXL_STEPS=26 SCALE=1
    SD15_REF=(--reference-warmup 5 --reference-steps 15)
    SDXL_REF=(--reference-warmup 3 --reference-steps 8)
    COMPILE=(--diffusers-compile --studio-compile) TRAIN_COMPILE=(--batches 1,8 --repeat 20) GEN_COMPILE=(--compile)
    TRAIN_SDPA=(--batches 1,8 --repeat 20)
    TRAIN_KERNELS=(--batches 8 --repeat 20)
    SD15_B8=(--torch-compile on)  # the fastest step a long run gets (auto compiles from about 13,000 steps)
    SUMMARY_FLAGS=()
fi

{
    echo "gpu_session: $(date -u +%FT%TZ) budget ${BUDGET_S}s parts: $PARTS"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c "import torch, diffusers, transformers, peft, accelerate as a; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', a.__version__)"
} 2>&1 | tee -a "$LOG"

# part NAME MIN_S CAP_S COMMAND...: run COMMAND (its output into the log) if MIN_S seconds are left, for at most
# CAP_S seconds and what the budget leaves; in TINY mode the minimum is not enforced.
part() {
    local name=$1 min=$(($2 * SCALE)) cap=$3
    shift 3
    local left=$((BUDGET_S - RESERVE_S - ($(date +%s) - START)))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -le 0 ] || [ "$left" -lt "$min" ]; then
        echo "part $name: skipped, ${left}s of the budget left (needs ${min}s)" | tee -a "$LOG"
        return
    fi
    echo "== part $name (at most ${limit}s): $*" >>"$LOG"
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    local why=""
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && why=" (stopped at its limit; its JSON keeps what it measured)"
    echo "part $name: $(($(date +%s) - t0))s, exit $rc$why" | tee -a "$LOG"
}

for p in $PARTS; do
    case $p in
    sd15_b8)
        part sd15_b8 160 280 "$PY" benchmarks/sd15.py "${SIZE[@]}" --work "$WORK/sd15" --batch 8 \
            --steps "$SD15_STEPS" "${SD15_REF[@]}" "${SD15_B8[@]}" --no-generate --json "$OUT/sd15_b8.json"
        ;;
    sd15_b8_cl)
        part sd15_b8_cl 100 220 "$PY" benchmarks/sd15.py "${SIZE[@]}" --work "$WORK/sd15" --batch 8 \
            --steps "$SD15_STEPS" --no-reference "${SD15_B8[@]}" --channels-last on --no-generate \
            --json "$OUT/sd15_b8_cl.json"
        ;;
    sd15_b8_plain_cmp | sd15_b8_cl_cmp)
        [ "$p" = sd15_b8_cl_cmp ] && layout=on || layout=off
        part "$p" 100 230 "$PY" benchmarks/sd15.py "${SIZE[@]}" --work "$WORK/sd15" --batch 8 \
            --steps "$SD15_STEPS" --no-reference "${SD15_B8[@]}" --channels-last "$layout" --compare-graphs \
            --no-generate --json "$OUT/$p.json"
        ;;
    sd15_b8_models)
        part sd15_b8_models 100 240 "$PY" benchmarks/sd15.py "${SIZE[@]}" --work "$WORK/sd15" --batch 8 \
            --steps "$SD15_STEPS" --no-reference "${SD15_B8[@]}" --compile-regions models --compare-graphs \
            --no-generate --json "$OUT/sd15_b8_models.json"
        ;;
    sd15_b8_warm)
        part sd15_b8_warm 60 160 "$PY" benchmarks/sd15.py "${SIZE[@]}" --work "$WORK/sd15" --batch 8 \
            --steps "$SD15_STEPS" --no-reference "${SD15_B8[@]}" --no-generate --json "$OUT/sd15_b8_warm.json"
        ;;
    gen_decoder)
        part gen_decoder 60 240 "$PY" benchmarks/gen_profile.py "${SIZE[@]}" --work "$WORK/sd15" "${GEN_COMPILE[@]}" \
            --no-levers --json "$OUT/gen_decoder.json"
        ;;
    gen_profile_sdxl)
        part gen_profile_sdxl 120 420 "$PY" benchmarks/gen_profile.py "${SIZE[@]}" --arch sdxl --work "$WORK/sdxl" \
            "${GEN_COMPILE[@]}" --json "$OUT/gen_profile_sdxl.json"
        ;;
    sdxl_b4_compile)
        part sdxl_b4_compile 120 300 "$PY" benchmarks/sdxl.py "${SIZE[@]}" --work "$WORK/sdxl" --batch 4 \
            --steps "$SDXL_STEPS" --no-reference --torch-compile on --json "$OUT/sdxl_b4_compile.json"
        ;;
    sd15_b1)
        part sd15_b1 45 120 "$PY" benchmarks/sd15.py "${SIZE[@]}" --work "$WORK/sd15" --batch 1 \
            --steps "$SD15_STEPS" "${SD15_REF[@]}" --no-generate --json "$OUT/sd15_b1.json"
        ;;
    sd15_gen | sd15_compile | sd15_compile_warm | gen_background | gen_both)
        # the adapter the training parts made; without one, a short run makes it first
        adapter=$(ls -t "$WORK"/sd15/run-*/bench.safetensors 2>/dev/null | head -1)
        if [ -n "$adapter" ]; then make=(--adapter "$adapter"); else make=(--steps 14 --no-flops); fi
        if [ "$p" = sd15_gen ]; then
            part sd15_gen 45 150 "$PY" benchmarks/sd15.py "${SIZE[@]}" --work "$WORK/sd15" --batch 1 "${make[@]}" \
                --no-reference --no-eager-generation --json "$OUT/sd15_gen.json"
        elif [ "$p" = gen_both ]; then
            part gen_both 90 420 "$PY" benchmarks/sd15.py "${SIZE[@]}" --work "$WORK/sd15" --batch 1 \
                "${make[@]}" --no-reference --no-overheads --no-eager-generation --no-diffusers --studio-background \
                --background-limit 200 --background-gap 0.5 --studio-compile --json "$OUT/gen_both.json"
        elif [ "$p" = gen_background ]; then
            part gen_background 60 300 "$PY" benchmarks/sd15.py "${SIZE[@]}" --work "$WORK/sd15" --batch 1 \
                "${make[@]}" --no-reference --no-overheads --no-eager-generation --no-diffusers --studio-background \
                --background-limit 200 --background-gap 0.5 --json "$OUT/gen_background.json"
        elif [ "$p" = sd15_compile_warm ]; then
            part sd15_compile_warm 30 120 "$PY" benchmarks/sd15.py "${SIZE[@]}" --work "$WORK/sd15" --batch 1 \
                "${make[@]}" --no-reference --no-overheads --no-eager-generation --no-diffusers --studio-compile \
                --json "$OUT/sd15_compile_warm.json"
        else
            part sd15_compile 60 330 "$PY" benchmarks/sd15.py "${SIZE[@]}" --work "$WORK/sd15" --batch 1 \
                "${make[@]}" --no-reference --no-overheads --no-eager-generation "${COMPILE[@]}" \
                --json "$OUT/sd15_compile.json"
        fi
        ;;
    sdxl_b1)
        part sdxl_b1 90 200 "$PY" benchmarks/sdxl.py "${SIZE[@]}" --work "$WORK/sdxl" --batch 1 \
            --steps "$SDXL_STEPS" --gpu-memory 8 --gradient-checkpointing auto --no-reference --generate \
            --json "$OUT/sdxl_b1.json"
        ;;
    sdxl_b4)
        part sdxl_b4 60 180 "$PY" benchmarks/sdxl.py "${SIZE[@]}" --work "$WORK/sdxl" --batch 4 \
            --steps "$SDXL_STEPS" "${SDXL_REF[@]}" --json "$OUT/sdxl_b4.json"
        ;;
    train_sdpa)
        part train_sdpa 40 120 "$PY" benchmarks/compile_probe.py "${TRAIN_SDPA[@]}" --sdpa --no-compile \
            --json "$OUT/train_sdpa.json"
        ;;
    train_kernels)
        part train_kernels 90 300 "$PY" benchmarks/compile_probe.py "${TRAIN_KERNELS[@]}" --kernels --blocks unet \
            --json "$OUT/train_kernels.json"
        ;;
    train_models)
        part train_models 90 240 "$PY" benchmarks/compile_probe.py "${TRAIN_KERNELS[@]}" --kernels --blocks models \
            --json "$OUT/train_models.json"
        ;;
    train_cl)
        part train_cl 90 240 "$PY" benchmarks/compile_probe.py "${TRAIN_KERNELS[@]}" --kernels --channels-last \
            --json "$OUT/train_cl.json"
        ;;
    train_compile)
        part train_compile 90 300 "$PY" benchmarks/compile_probe.py "${TRAIN_COMPILE[@]}" --json "$OUT/train_compile.json"
        ;;
    *)
        echo "gpu_session: unknown part $p; the parts are sd15_b8 sd15_b8_cl sd15_b8_warm sd15_b1 sd15_gen gen_decoder sdxl_b1" \
            "sdxl_b4 sdxl_b4_compile sd15_compile sd15_compile_warm gen_background train_sdpa train_kernels train_cl" \
            "train_models sd15_b8_plain_cmp sd15_b8_cl_cmp sd15_b8_models gen_both gen_profile_sdxl train_compile" | tee -a "$LOG"
        ;;
    esac
done

echo "gpu_session: parts done after $(($(date +%s) - START))s" | tee -a "$LOG"
"$PY" benchmarks/summary.py --results "$OUT" --sources "${SUMMARY_FLAGS[@]}" 2>>"$LOG" | tee -a "$LOG"
