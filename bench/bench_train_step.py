"""One training step of ours vs transformers' same-config model: time and peak memory.

    python bench/bench_train_step.py [--threads 1] [--repeats 10] [--batch 8] [--tokens 128] [--profile]

The step is the paper's (README.md, "The method"): bidirectional forward, mean pooling, the pooled
vector's logits through lm_head in fp32, KL against a sparse uniform target (k ids), backward,
clip, AdamW step; LoRA r=16 alpha=32 dropout 0.05 on the 7 projections. Both sides load the
same random checkpoint (written with transformers' save_pretrained), get the same inputs and
adapters of the same shape and values (transformers' side: bench/common.py PeftStyleLoRA,
since peft is not installed). Time: medians of steps alternating ours/theirs in one process.
Memory: peak RSS above the RSS just before the first step, each side in a fresh subprocess.

Dimensions: B batch, T tokens, D hidden, V vocabulary, k target slots.
Not included: gradient checkpointing and bf16 (bench/gpu_check.py has both, on CUDA).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402  (puts the repo root and tests/ on sys.path)

import model as M  # noqa: E402
import targets as T  # noqa: E402

CONFIG = C.BENCH_LLAMA  # Llama-shaped, a few hundred ms per step on one CPU thread
R, ALPHA, DROPOUT, K = 16, 32, 0.05, 32


def write_checkpoint(path):
    import hf_reference
    C.quiet_transformers()
    return hf_reference.save_random_checkpoint(path, CONFIG, seed=0)


class Side:
    """One side of the comparison: a model with a LoRA, an optimizer, and `step(ids, mask, target)`."""

    def __init__(self, side, path, dropout=DROPOUT):
        self.side = side
        if side == "ours":
            self.model, tok = M.load(path)
            self.params = M.add_lora(self.model, R, ALPHA, dropout)
            self.emb = M.Embedder(self.model, tok, "mean", causal=False)
        else:
            import hf_reference
            C.quiet_transformers()
            self.model = hf_reference.load_hf(path, attn_implementation="sdpa")
            self.wrapped = C.hf_add_lora(self.model, R, ALPHA, dropout)
            self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.model.train()
        self.opt = torch.optim.AdamW(self.params, lr=5e-5, weight_decay=0.0)

    def loss(self, ids, mask, target):
        if self.side == "ours":
            h = self.emb.embed_ids(ids, mask, mask)  # [B, D] fp32
            return T.kl_loss(self.model.token_logits(h), target)
        h = C.hf_mean_embed(self.model, ids, mask)  # [B, D] fp32
        return C.reference_kl(self.model.lm_head(h), *target)

    def step(self, ids, mask, target):
        loss = self.loss(ids, mask, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss)


def inputs(args):
    ids, mask = C.random_lengths_batch(args.batch, args.tokens, CONFIG["vocab_size"], seed=0)
    return ids, mask, C.sparse_uniform_target(args.batch, CONFIG["vocab_size"], K, seed=1)


def child(args):
    """Fresh process: one side's peak RSS increase over a few steps (printed as JSON)."""
    torch.set_num_threads(args.threads)
    side = Side(args.child, args.ckpt)
    ids, mask, target = inputs(args)
    base = C.rss_bytes()
    reset = C.reset_peak()
    start_peak = C.peak_rss_bytes()
    for _ in range(3):
        side.step(ids, mask, target)
    peak = C.peak_rss_bytes()
    # without a reset, VmHWM may predate the steps; then only an increase above it is seen
    print(json.dumps(dict(peak_increase=peak - base, reset=reset, start_peak_above_base=start_peak - base)))


def measure_memory(args, ckpt):
    out = {}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for side in ("ours", "theirs"):
        cmd = [sys.executable, __file__, "--child", side, "--ckpt", str(ckpt), "--threads", str(args.threads),
               "--batch", str(args.batch), "--tokens", str(args.tokens)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"{side} memory child failed:\n{res.stderr[-3000:]}")
        out[side] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def check_agreement(ours, theirs, ids, mask, target):
    """Dropout off, same nonzero adapters: same loss and LoRA gradients (a fair comparison)."""
    with torch.no_grad():
        for n, p in ours.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    C.copy_lora(ours.model, theirs.wrapped)
    ours.model.eval(), theirs.model.eval()
    l_ours, l_theirs = ours.loss(ids, mask, target), theirs.loss(ids, mask, target)
    l_ours.backward(), l_theirs.backward()
    g_ours = dict((n, p.grad) for n, p in ours.model.named_parameters() if p.requires_grad)
    worst = 0.0
    for name, lora in theirs.wrapped.items():
        for a in ("A", "B"):
            g = getattr(lora, f"lora_{a}").weight.grad
            if not g.abs().max() > 0:
                raise RuntimeError(f"{name}.lora_{a}: zero gradient, the agreement check would be vacuous")
            worst = max(worst, float((g - g_ours[f"{name}.lora_{a}"]).abs().max() / g.abs().max().clamp(min=1e-12)))
    ours.opt.zero_grad(set_to_none=True), theirs.opt.zero_grad(set_to_none=True)
    ours.model.train(), theirs.model.train()
    return float(l_ours.detach()), float(l_theirs.detach()), worst


def profile(side, ids, mask, target, rows=15):
    from torch.profiler import ProfilerActivity, profile as prof
    with prof(activities=[ProfilerActivity.CPU]) as p:
        side.step(ids, mask, target)
    print(f"\nprofile of one step, {side.side}:")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is stable on a busy machine)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per side")
    p.add_argument("--batch", type=int, default=8, help="texts per step (B)")
    p.add_argument("--tokens", type=int, default=128, help="longest text in tokens (T); others 1/4..1 of it")
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of one step per side")
    p.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    p.add_argument("--child", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp) / "ckpt")
        mem = measure_memory(args, ckpt)
        ours, theirs = Side("ours", ckpt), Side("theirs", ckpt)
        ids, mask, target = inputs(args)
        l_ours, l_theirs, grad_err = check_agreement(ours, theirs, ids, mask, target)
        times = {"ours": [], "theirs": []}
        for i in range(args.repeats + 2):  # 2 warm-up steps each, then alternate
            for side in (ours, theirs) if i % 2 == 0 else (theirs, ours):
                t0 = time.perf_counter()
                side.step(ids, mask, target)
                if i >= 2:
                    times[side.side].append(time.perf_counter() - t0)
        if args.profile:
            profile(ours, ids, mask, target), profile(theirs, ids, mask, target)
    med = {s: C.median(t) * 1000 for s, t in times.items()}
    peak = {s: mem[s]["peak_increase"] / 2**20 for s in mem}
    n_tok = int(mask.sum())
    rows = [
        ["ours", f"{med['ours']:.1f}", f"{min(times['ours']) * 1000:.1f}", f"{peak['ours']:.1f}"],
        ["transformers", f"{med['theirs']:.1f}", f"{min(times['theirs']) * 1000:.1f}", f"{peak['theirs']:.1f}"],
        ["ratio ours/transformers", f"{med['ours'] / med['theirs']:.2f}", "",
         f"{peak['ours'] / peak['theirs']:.2f}"],
    ]
    cfg = CONFIG
    notes = [f"Config: Llama, D={cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
             f"{cfg['num_attention_heads']}/{cfg['num_key_value_heads']} heads, F={cfg['intermediate_size']}, "
             f"V={cfg['vocab_size']}; B={args.batch}, T={args.tokens} ({n_tok} real tokens), LoRA r={R} on 7 "
             f"projections, fp32, {args.repeats} timed steps per side (alternating, after 2 warm-up).",
             f"Agreement (dropout off): loss {l_ours:.6f} vs {l_theirs:.6f}, LoRA gradients max relative "
             f"difference {grad_err:.1e}.",
             "Peak memory: VmHWM - VmRSS before the first of 3 steps, fresh process per side "
             f"(VmHWM reset: {mem['ours']['reset']}).",
             f"Target: time ratio <= 1.0: {'met' if med['ours'] <= med['theirs'] else 'NOT met'}."]
    C.report("Training step (CPU)", ["side", "median ms/step", "min ms", "peak RSS increase MiB"], rows,
             notes, write=not args.no_write)


if __name__ == "__main__":
    main()
