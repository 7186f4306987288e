"""Where a LoRA training step's time goes on a GPU: torch.profiler over a few steps of the
paper's loss on a random model shaped like Qwen2.5-0.5B (or --shape llama8b), bf16 autocast.

    python bench/gpu_profile.py [--shape qwen05b|llama8b] [--tokens 32] [--ckpt]

Prints step times at two sequence lengths (is the step bound by the work or by overhead?) and
the profiler's top operators by GPU and by CPU time.

Not included: multi-GPU, the teacher pass (bench/bench_teacher.py measures its share).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402
import targets as T  # noqa: E402

SHAPES = {
    "qwen05b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True, rope_theta=1e6),
    "llama8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, intermediate_size=14336, rope_theta=5e5),
}


def build(shape, device):
    args = M.args_from_config(SHAPES[shape])
    with torch.device(device):
        m = M.Transformer(args).to(torch.bfloat16)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.02)
    params = M.add_lora(m, 16, 32, 0.05)
    for p in params:
        p.data = p.data.float()
    return m, params


def step(m, params, opt, ids, att, target):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = M.mean_pool(m(ids, att, causal=False), att)  # [B, D]
    loss = T.kl_loss(m.token_logits(h), target)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def time_steps(m, params, opt, B, Tn, n=5):
    V = m.args.vocab_size
    ids = torch.randint(0, V, (B, Tn), device="cuda")
    att = torch.ones(B, Tn, dtype=torch.bool, device="cuda")
    target = (torch.randint(0, V, (B, 16), device="cuda"), torch.full((B, 16), 1 / 16, device="cuda"))
    for _ in range(2):
        step(m, params, opt, ids, att, target)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step(m, params, opt, ids, att, target)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1000, (ids, att, target)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=list(SHAPES), default="qwen05b")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ckpt", action="store_true")
    a = p.parse_args()
    m, params = build(a.shape, "cuda")
    m.train()
    m.grad_checkpointing = a.ckpt
    opt = torch.optim.AdamW(params, lr=1e-5)
    for Tn in (32, 128):
        ms, batch = time_steps(m, params, opt, a.batch, Tn)
        print(f"{a.shape} B={a.batch} T={Tn} ckpt={a.ckpt}: {ms:.1f} ms/step, {a.batch * Tn / ms * 1000:.0f} tokens/s")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step(m, params, opt, *batch)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
