#!/usr/bin/env bash
# The user's path on a GPU, end to end, with the real command lines: a random-weight checkpoint
# shaped like Qwen2.5-0.5B (real config values and the real Qwen2.5 tokenizer, written in the HF
# layout by transformers), stage 1 then stage 2 with bf16 autocast and gradient checkpointing,
# a resume, torchrun (1 process, NCCL), evaluate.py, inspect and export. ~3 minutes on an H100.
#     bash bench/gpu_e2e.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash bench/gpu_e2e.sh OUT_DIR}"
mkdir -p "$out"
py="${PYTHON:-python3}"
work="$(mktemp -d)"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
data=data/wiki1m_sample/wiki1m_for_simcse.head11913.txt
log() { echo "[$(date +%T)] $*" | tee -a "$out/e2e.log"; }

log "writing a random Qwen2.5-0.5B-shaped checkpoint"
"$py" - "$work/qwen" <<'EOF' 2>&1 | tee -a "$out/e2e.log"
import sys, torch, transformers
import os
tiny = os.environ.get("E2E_TINY") == "1"  # a CPU try-out of this script: 2 small layers
cfg = transformers.Qwen2Config(vocab_size=151936, hidden_size=64 if tiny else 896, num_hidden_layers=2 if tiny else 24,
                               num_attention_heads=4 if tiny else 14, num_key_value_heads=2,
                               intermediate_size=128 if tiny else 4864, rope_theta=1e6, rms_norm_eps=1e-6,
                               tie_word_embeddings=True, max_position_embeddings=32768, bos_token_id=151643,
                               eos_token_id=151645)
torch.manual_seed(0)
m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
m.save_pretrained(sys.argv[1])
tok = transformers.AutoTokenizer.from_pretrained("tests/fixtures/configs/Qwen2.5-7B-Instruct")  # vocab + merges
tok.save_pretrained(sys.argv[1])
print("saved", sys.argv[1], sum(p.numel() for p in m.parameters()) / 1e6, "M parameters")
EOF

t0=$SECONDS
log "stage 1 (bf16, grad checkpointing, 40 steps of 32, killed at step 20 and resumed)"
common1=(--stage 1 --model "$work/qwen" --data "$data" --batch-size 32 --max-steps 40 --lr 1e-4
         --grad-checkpointing --save-every 10 --log-every 10 --out "$work/s1")
timeout -s KILL 600 "$py" t2t.py train "${common1[@]}" > "$out/stage1_full.log" 2>&1 &
pid=$!
while [ ! -d "$work/s1/checkpoints/step-20" ] && kill -0 $pid 2>/dev/null; do sleep 0.2; done
kill -9 $pid 2>/dev/null || true; wait $pid 2>/dev/null || true
log "killed; resuming"
"$py" t2t.py train "${common1[@]}" --resume 2>&1 | tee "$out/stage1.log" | tail -4
log "stage 1 took $((SECONDS - t0)) s"

t0=$SECONDS
log "stage 2 (teacher = student with adapter off, background over 2048 texts)"
"$py" t2t.py train --stage 2 --init "$work/s1" --data "$data" --batch-size 16 --grad-accum 2 --max-steps 30 \
    --lr 1e-4 --tau 1e-4 --background-samples 2048 --grad-checkpointing --log-every 10 --out "$work/s2" \
    2>&1 | tee "$out/stage2.log" | tail -4
log "stage 2 took $((SECONDS - t0)) s"

log "torchrun, 1 process (NCCL)"
"$py" -m torch.distributed.run --nproc_per_node 1 t2t.py train --model "$work/qwen" --data "$data" \
    --batch-size 32 --max-steps 5 --out "$work/ddp" 2>&1 | tail -2 | tee -a "$out/e2e.log"

log "evaluate.py on CUDA, bf16"
dev=$("$py" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
dt=$([ "$dev" = cuda ] && echo bfloat16 || echo float32)
"$py" evaluate.py --model "$work/s2" --tasks STSBenchmark --device "$dev" --dtype "$dt" --output "$work/results" \
    2>&1 | grep -v "texts/s" | tail -6 | tee -a "$out/e2e.log"
log "inspect and export"
"$py" t2t.py inspect --model "$work/s2" "The quick brown fox jumps over the lazy dog." 2>&1 | tail -3 | tee -a "$out/e2e.log"
"$py" t2t.py export --model "$work/s2" --out "$work/export" --dtype bf16 2>&1 | tail -1 | tee -a "$out/e2e.log"
ls -la "$work/export" | tee -a "$out/e2e.log"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null | tee -a "$out/e2e.log" || true
log "done"
