"""Every GPU check in one run, under 8 minutes on one H100/H200; --dry-run does the same on CPU with
tiny shapes in under a minute (tests/test_bench.py runs it).

    python bench/gpu_check.py --out DIR [--budget-s 450] [--dry-run]    (or: bash bench/gpu_check.sh DIR)

Sections, in this order, each time-boxed (a section that overruns its share is stopped with a
note, and sections are skipped once the budget is spent):
  1. env: torch/CUDA/transformers versions, the GPU, nvidia-smi.
  2. train: bf16 LoRA training steps (r=16 alpha=32 dropout 0.05 on the 7 projections, fp32
     adapters + AdamW, bf16 autocast, frozen bf16 base, bidirectional, mean pooling, fp32 logits
     of the pooled vectors, KL to a sparse target), batch 32 x 128 tokens (no padding), on random
     models built directly on the GPU (no file) with the real configs of Qwen2.5-0.5B and
     Meta-Llama-3-8B-Instruct: ours with and without gradient checkpointing, transformers' with a
     peft-shaped LoRA side by side (8B: checkpointing only). Tokens/s, model FLOP utilisation,
     peak GPU memory (torch.cuda.max_memory_allocated, GB = 1e9 bytes).
  3. encode: Embedder.encode vs a naive transformers loop (input order, pad to longest) in bf16,
     500 SciFact documents, max length 512, the random Qwen2.5-0.5B shape (same weights on both
     sides) with Mistral's tokenizer; texts/s and embedding agreement.
  4. agreement: bf16 vs fp32 embeddings (cosine, per text) of the bundled stories260K and of a
     random Qwen2.5-0.5B shape initialised N(0, 0.02) with a fixed seed.
  5. tests: `python -m pytest -q -m cuda tests/` (skipped with a note if pytest is missing).
  6. train 8B without checkpointing (last: it may not fit an 80 GB card; an OOM is reported).
  7. grouped: the 0.5B shape on real sentences (the bundled Wikipedia sample, Mistral's
     tokenizer), batch 32, max length 128: random batches vs t2t.py's length-grouped ones
     (t2t.epoch_batches), eager and compiled; real tokens/s.
  8. compiled: the section 2 and 6 steps again with model.compile_layers (t2t.py train --compile;
     the 2 warm-up steps, compile included, reported apart), and for the 0.5B shape also mode
     "reduce-overhead" (CUDA graphs against its kernel-launch bound); the ratio column is against
     transformers' eager step of the same setting. Targets: 8B >= 50% MFU without checkpointing,
     >= 35% with; 0.5B >= 2x transformers' tokens/s.
Every optimizer is AdamW with fused=True on CUDA, as t2t.py's.

FLOPs per step (model FLOPs, recomputation by checkpointing not counted):
  4 * N * B*T           frozen base matmuls: forward 2N, backward 2N (input gradients only, no
                        weight gradients); N = weights of q,k,v,o,gate,up,down over all layers
  + 6 * N_lora * B*T    adapters: forward 2, backward 4 (input and weight gradients)
  + 12 * L * H * hd * B * T^2   attention scores and values (bidirectional: the full T x T),
                        forward 4 * T^2 * hd per head and layer, backward twice that
  + 4 * B * D * V       pooled logits through the LM head, forward and input gradient
MFU = FLOPs / step time / peak dense bf16 FLOP/s (H100/H200 SXM: 989.4e12).

Writes into DIR: gpu_check.log (everything, with tracebacks), results.json, summary.md (the final
table), env.txt, pytest_cuda.log.

Dimensions: B batch, T tokens, D hidden, L layers, H heads, K kv heads, hd head dim, F ffn width,
V vocabulary, r LoRA rank.
Not included: multi-GPU, fp16, loading real checkpoints (no network on the GPU machine).
"""

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402  (puts the repo root and tests/ on sys.path)

import model as M  # noqa: E402
import targets as T  # noqa: E402
import tokenizer  # noqa: E402

# Qwen2.5-0.5B's config.json values (hidden 896, 24 layers, 14/2 heads, ffn 4864, tied, V 151936)
QWEN05 = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
              rope_theta=1000000.0, hidden_act="silu", tie_word_embeddings=True, use_sliding_window=False,
              sliding_window=32768, bos_token_id=151643, eos_token_id=151643)
LLAMA8B = json.loads((C.ROOT / "tests/fixtures/configs/Meta-Llama-3-8B-Instruct/config.json").read_text())
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense, SXM datasheets
R, ALPHA, DROPOUT, K_TARGET = 16, 32, 0.05, 64
GB = 1e9


class SectionTimeout(BaseException):
    """Not an Exception: the per-configuration `except Exception` below must let it through."""


class Check:
    """The run: settings (full or dry), the log, the results and the table rows."""

    def __init__(self, out: Path, dry: bool, budget_s: float):
        self.out, self.dry, self.budget_s = out, dry, budget_s
        self.t0 = time.time()
        self.device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
        self.dtype = torch.bfloat16  # CPU autocast runs bf16 too; tiny shapes keep it fast
        # the dry run compiles with aot_eager: the same graphs, no minute of C++ kernel builds
        self.compile_backend = "aot_eager" if self.device.type == "cpu" else "inductor"
        self.log_file = open(out / "gpu_check.log", "a")
        self.results, self.rows, self.notes = {}, [], []
        if dry:  # tiny shapes of the same structures
            import hf_reference
            self.qwen = hf_reference.shrink_config(QWEN05, layers=2, hidden=64, heads=4, ffn=96)
            self.llama = hf_reference.shrink_config(LLAMA8B, layers=2, hidden=64, heads=8, ffn=128)
            self.B, self.T, self.steps, self.n_docs, self.max_len = 4, 16, 2, 24, 64
        else:
            self.qwen, self.llama = QWEN05, LLAMA8B
            self.B, self.T, self.steps, self.n_docs, self.max_len = 32, 128, 5, 500, 512

    def log(self, msg=""):
        line = f"[{time.time() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def left(self):
        return self.budget_s - (time.time() - self.t0)

    def row(self, check, setting, ours="", theirs="", ratio=""):
        self.rows.append([check, setting, ours, theirs, ratio])

    def save(self):
        """Rewritten after every section, so a killed run still leaves what it measured."""
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str))
        table = C.format_table(["check", "setting", "ours", "transformers", "ours/transformers"], self.rows)
        head = (f"gpu_check {'--dry-run ' if self.dry else ''}on {device_name(self.device)}, "
                f"torch {torch.__version__}, {time.time() - self.t0:.0f} s\n\n")
        (self.out / "summary.md").write_text(head + table + "\n" + "".join(f"\n- {n}" for n in self.notes) + "\n")
        return head + table


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({C.cpu_model()})"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device):
    return torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else float("nan")


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def time_box(seconds):
    """Raise SectionTimeout in the main thread after `seconds` (between Python bytecodes)."""
    def handler(signum, frame):
        raise SectionTimeout(f"over its {seconds:.0f} s share")
    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_section(check, name, fn, share_s, min_s):
    """Run one section within min(share, budget left); log and note failures, go on."""
    left = check.left()
    if left < min_s:
        check.log(f"== {name}: SKIPPED ({left:.0f} s of the budget left, needs ~{min_s} s)")
        check.notes.append(f"{name}: skipped, budget spent")
        check.row(name, "skipped: budget spent")
        return
    check.log(f"== {name} (share {min(share_s, left):.0f} s)")
    t = time.time()
    try:
        with time_box(min(share_s, left)):
            fn(check)
    except SectionTimeout as e:
        check.log(f"{name}: stopped, {e}")
        check.notes.append(f"{name}: stopped {e}; later steps of it skipped")
    except Exception as e:  # a broken section must not hide the others' results
        check.log(f"{name}: FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        check.notes.append(f"{name}: FAILED ({type(e).__name__}: {str(e)[:200]}), see gpu_check.log")
        check.row(name, f"FAILED: {type(e).__name__}")
    finally:
        free_memory()
    check.log(f"== {name} done in {time.time() - t:.1f} s")
    check.save()


# -----------------------------------------------------------------------------
# Models built directly on the device


@torch.no_grad()
def init_(model, seed, std=0.02):
    """N(0, std) for matrices, 1 for norm weights, 0 for biases (HF's initializer_range)."""
    dev = next(model.parameters()).device
    g = torch.Generator(dev).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        elif p.ndim == 1:
            p.zero_()
        else:
            p.normal_(0.0, std, generator=g)


def build_ours(cfg, device, dtype, seed=0):
    """Our Transformer on the meta device, then storage on `device` in `dtype`: one copy."""
    args = M.args_from_config(cfg)
    with torch.device("meta"):
        model = M.Transformer(args)
    model = model.to(dtype).to_empty(device=device)
    if args.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    init_(model, seed)
    return model


def hf_config(cfg):
    from transformers import AutoConfig
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        config = AutoConfig.from_pretrained(tmp)
    config.use_cache = False
    return config


def build_hf(cfg, device, dtype, ours=None):
    """transformers' model for the same config on `device`; with `ours`, the same weights."""
    from transformers import AutoModelForCausalLM
    C.quiet_transformers()
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(hf_config(cfg), dtype=dtype, attn_implementation="sdpa")
    hf.to(device)  # a no-op where the device context was honoured
    if ours is not None:
        state = {("" if k == "lm_head.weight" else "model.") + k: v for k, v in ours.state_dict().items()}
        hf.load_state_dict(state, strict=True)
    return hf


# -----------------------------------------------------------------------------
# Training steps


def flops_per_step(cfg, B, T, r=R):
    """Model FLOPs of one LoRA step (see the module docstring)."""
    a = M.args_from_config(cfg)
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    shapes = [(a.dim, q), (a.dim, kv), (a.dim, kv), (q, a.dim), (a.dim, a.ffn_dim), (a.dim, a.ffn_dim),
              (a.ffn_dim, a.dim)]  # (in, out) of q,k,v,o,gate,up,down
    n = a.n_layers * sum(i * o for i, o in shapes)
    n_lora = a.n_layers * sum(r * (i + o) for i, o in shapes)
    tokens = B * T
    attn = 12 * a.n_layers * a.n_heads * a.head_dim * B * T * T
    return 4 * n * tokens + 6 * n_lora * tokens + attn + 4 * B * a.dim * a.vocab_size


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def ours_trainer(model, grad_ckpt, device, compile_backend=None, compile_mode=None):
    params = M.add_lora(model, R, ALPHA, DROPOUT)
    for p in params:
        p.data = p.data.float()  # as t2t.build_student: fp32 adapters under autocast
    model.grad_checkpointing = grad_ckpt
    if compile_backend:  # as t2t.py train --compile
        M.compile_layers(model, compile_backend, compile_mode)
    model.train()

    def loss_fn(ids, mask, target):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            h = M.mean_pool(model(ids, mask, causal=False), mask)  # [B, D] fp32
        return T.kl_loss(model.token_logits(h), target)  # [B, V] fp32 logits, never [B, T, V]
    return params, loss_fn


def hf_trainer(hf, grad_ckpt, device):
    import torch.nn.functional as F
    C.hf_add_lora(hf, R, ALPHA, DROPOUT)
    params = [p for p in hf.parameters() if p.requires_grad]
    if grad_ckpt:
        with warnings.catch_warnings():  # renamed activation_checkpointing_enable in v5.2x, same kwargs
            warnings.simplefilter("ignore", FutureWarning)
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.train()

    def loss_fn(ids, mask, target):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            h = C.hf_mean_embed(hf, ids, mask)  # [B, D] fp32
        logits = F.linear(h, hf.lm_head.weight.float())  # [B, V] fp32, as ours
        return C.reference_kl(logits, *target)
    return params, loss_fn


def time_steps(check, params, loss_fn, cfg, label):
    """Warm-up 2 steps, then check.steps timed ones -> dict of measurements."""
    dev = check.device
    vocab = cfg["vocab_size"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(vocab, 32000), (check.B, check.T), generator=g).to(dev)
    mask = torch.ones(check.B, check.T, dtype=torch.bool, device=dev)
    target = C.sparse_uniform_target(check.B, vocab, K_TARGET, seed=1, device=dev)
    opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0, fused=dev.type == "cuda")  # as t2t.py

    def step():
        loss = loss_fn(ids, mask, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync(dev)
    reset_peak(dev)
    t = time.perf_counter()
    for _ in range(2):
        loss = step()
    sync(dev)
    warmup_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(check.steps):
        loss = step()
    sync(dev)
    dt = (time.perf_counter() - t) / check.steps
    flops = flops_per_step(cfg, check.B, check.T)
    peak = peak_flops(dev)
    res = dict(ms_per_step=dt * 1000, tokens_per_s=check.B * check.T / dt, tflops=flops / dt / 1e12,
               mfu=flops / dt / peak if peak else None, peak_gb=peak_gb(dev), loss=float(loss.detach()),
               flops_per_step=flops, steps=check.steps, B=check.B, T=check.T, warmup_s=warmup_s)
    check.log(f"{label}: {res['ms_per_step']:.1f} ms/step, {res['tokens_per_s']:.0f} tokens/s, "
              f"{res['tflops']:.1f} TFLOP/s, MFU {res['mfu'] if res['mfu'] is None else round(100 * res['mfu'], 1)}%, "
              f"peak {res['peak_gb']:.2f} GB, loss {res['loss']:.4f}")
    return res


def train_pair(check, name, cfg, ckpt_settings, hf_ckpt_settings):
    """Ours for each checkpointing setting, then transformers' for its settings; rows per setting."""
    out = check.results.setdefault(f"train {name}", {})
    for side, settings in (("ours", ckpt_settings), ("transformers", hf_ckpt_settings)):
        for grad_ckpt in settings:
            key = f"{side} ckpt {'on' if grad_ckpt else 'off'}"
            try:
                if side == "ours":
                    model = build_ours(cfg, check.device, check.dtype)
                    params, loss_fn = ours_trainer(model, grad_ckpt, check.device)
                else:
                    model = build_hf(cfg, check.device, check.dtype)
                    params, loss_fn = hf_trainer(model, grad_ckpt, check.device)
                out[key] = time_steps(check, params, loss_fn, cfg, f"{name} {key}")
            except torch.cuda.OutOfMemoryError as e:
                out[key] = dict(error=f"OOM: {str(e)[:300]}")
                check.log(f"{name} {key}: out of GPU memory")
            except Exception as e:  # one broken configuration must not hide the others
                out[key] = dict(error=f"ERR: {type(e).__name__}: {str(e)[:300]}")
                check.log(f"{name} {key}: FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()}")
                check.notes.append(f"{name} {key}: FAILED ({type(e).__name__}: {str(e)[:200]}), see gpu_check.log")
            finally:
                model = params = loss_fn = None
                free_memory()
            check.save()
    for grad_ckpt in sorted(set(ckpt_settings) | set(hf_ckpt_settings)):
        on = "on" if grad_ckpt else "off"
        o, t = out.get(f"ours ckpt {on}"), out.get(f"transformers ckpt {on}")
        setting = f"{name}, ckpt {on}"
        for metric, label, fmt in (("tokens_per_s", "train tokens/s", "{:.0f}"), ("mfu", "train MFU", "{:.1%}"),
                                   ("peak_gb", "train peak GB", "{:.2f}")):
            def val(r):
                if r is None:
                    return "-"
                if "error" in r:
                    return r["error"].split(":")[0]  # OOM or ERR
                return "n/a" if r[metric] is None or math.isnan(r[metric]) else fmt.format(r[metric])
            ratio = ""
            if val(o)[0].isdigit() and val(t)[0].isdigit():
                ratio = f"{o[metric] / t[metric]:.2f}"
            check.row(label, setting, val(o), val(t), ratio)


def section_train_small(check):
    train_pair(check, "Qwen2.5-0.5B" if not check.dry else "Qwen2.5-0.5B (tiny)", check.qwen, (False, True),
               (False, True))


def section_train_8b(check):
    train_pair(check, "Llama-3-8B" if not check.dry else "Llama-3-8B (tiny)", check.llama, (True,), (True,))


def section_train_8b_no_ckpt(check):
    train_pair(check, "Llama-3-8B" if not check.dry else "Llama-3-8B (tiny)", check.llama, (False,), ())


# (name, config attribute, gradient checkpointing, torch.compile mode) of the compiled re-runs
COMPILED = (("Qwen2.5-0.5B", "qwen", False, None), ("Qwen2.5-0.5B", "qwen", True, None),
            ("Qwen2.5-0.5B", "qwen", False, "reduce-overhead"), ("Llama-3-8B", "llama", True, None),
            ("Llama-3-8B", "llama", False, None))


def section_train_compiled(check):
    """Ours with compile_layers on the section 2/6 settings; rows against transformers' eager step."""
    for name, which, grad_ckpt, mode in COMPILED:
        if mode and check.device.type != "cuda":
            continue  # CUDA graphs need a GPU
        label = name if not check.dry else f"{name} (tiny)"
        cfg, on = getattr(check, which), "on" if grad_ckpt else "off"
        key = f"ours compiled{f' {mode}' if mode else ''} ckpt {on}"
        out = check.results.setdefault(f"train {label}", {})
        try:
            model = build_ours(cfg, check.device, check.dtype)
            params, loss_fn = ours_trainer(model, grad_ckpt, check.device, check.compile_backend, mode)
            out[key] = time_steps(check, params, loss_fn, cfg, f"{label} {key}")
        except torch.cuda.OutOfMemoryError as e:
            out[key] = dict(error=f"OOM: {str(e)[:300]}")
            check.log(f"{label} {key}: out of GPU memory")
        except Exception as e:  # one broken configuration must not hide the others
            out[key] = dict(error=f"ERR: {type(e).__name__}: {str(e)[:300]}")
            check.log(f"{label} {key}: FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            check.notes.append(f"{label} {key}: FAILED ({type(e).__name__}: {str(e)[:200]}), see gpu_check.log")
        finally:
            model = params = loss_fn = None
            if mode:  # CUDA graph trees keep their memory pool while dynamo's cache holds them
                torch._dynamo.reset()
            free_memory()
        compiled_rows(check, label, key, out[key], out.get(f"transformers ckpt {on}"))
        check.save()


def compiled_rows(check, label, key, res, theirs):
    setting = f"{label}, {key.removeprefix('ours ')}"
    if "error" in res:
        check.row("train tokens/s", setting, res["error"].split(":")[0])
        return
    ok = theirs is not None and "error" not in theirs
    check.row("train tokens/s", setting, f"{res['tokens_per_s']:.0f}", f"{theirs['tokens_per_s']:.0f}" if ok else "-",
              f"{res['tokens_per_s'] / theirs['tokens_per_s']:.2f}" if ok else "")
    if res["mfu"] is not None:
        check.row("train MFU", setting, f"{res['mfu']:.1%}", f"{theirs['mfu']:.1%}" if ok and theirs["mfu"] else "-")
    check.row("train compile s", setting, f"{res['warmup_s']:.1f}", "", "(2 warm-up steps, compile included)")


def section_train_grouped(check):
    """Real sentences, batch B, max length 128: random vs length-grouped batches, eager and compiled."""
    import t2t
    texts = t2t.read_texts(t2t.DEFAULT_DATA)
    with tempfile.TemporaryDirectory() as tmp:
        tok = tokenizer.Tokenizer.from_dir(tokenizer_dir(check.qwen, tmp))
    max_len = 128 if not check.dry else 32
    encoded = tok.encode(texts, max_length=max_len)
    lengths = [len(x) for x in encoded]
    label = "Qwen2.5-0.5B" if not check.dry else "tiny"
    out = check.results.setdefault("train grouped", {})
    for name, grouped, backend in (("random batches", False, None), ("grouped batches", True, None),
                                   ("grouped batches, compiled", True, check.compile_backend)):
        batches = t2t.epoch_batches(len(texts), 0, check.B, seed=0, lengths=lengths if grouped else None)
        model = build_ours(check.qwen, check.device, check.dtype)
        params, loss_fn = ours_trainer(model, False, check.device, backend)
        opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0, fused=check.device.type == "cuda")
        target = C.sparse_uniform_target(check.B, check.qwen["vocab_size"], K_TARGET, seed=1, device=check.device)
        real = 0
        for i, idx in enumerate(batches[: 2 * check.steps + 2]):  # 2 warm-up steps (the longest batch first)
            if i == 2:
                sync(check.device)
                t, real = time.perf_counter(), 0
            ids, att = M.pad_batch([encoded[j] for j in idx], tok.pad_id)
            loss = loss_fn(ids.to(check.device), att.to(check.device), target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            real += int(att.sum())
        sync(check.device)
        out[name] = dict(real_tokens_per_s=real / (time.perf_counter() - t), steps=2 * check.steps)
        check.log(f"grouped: {name}: {out[name]['real_tokens_per_s']:.0f} real tokens/s")
        model = params = loss_fn = opt = None
        free_memory()
    base = out["random batches"]["real_tokens_per_s"]
    for name, r in out.items():
        check.row("train real tokens/s", f"{label}, Wikipedia, batch {check.B}, {name} (ratio: vs random)",
                  f"{r['real_tokens_per_s']:.0f}", "", f"{r['real_tokens_per_s'] / base:.2f}")


# -----------------------------------------------------------------------------
# Encoding throughput and bf16 agreement


def tokenizer_dir(cfg, tmp):
    """A folder with a tokenizer that fits the vocabulary: Mistral's (32000) or stories260K's (512)."""
    src = C.MISTRAL_TOKENIZER if cfg["vocab_size"] >= 32000 else C.STORIES
    path = Path(tmp) / "tok"
    path.mkdir(exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, path / name)
    return path  # no config.json: AutoTokenizer then follows tokenizer_config's tokenizer_class


def section_encode(check):
    import numpy as np
    from transformers import AutoTokenizer
    texts = C.scifact_texts(check.n_docs)
    batch = 64 if not check.dry else 8
    with tempfile.TemporaryDirectory() as tmp:
        tdir = tokenizer_dir(check.qwen, tmp)
        tok = tokenizer.Tokenizer.from_dir(tdir)
        hf_tok = AutoTokenizer.from_pretrained(tdir)
    if hf_tok.pad_token is None:
        hf_tok.pad_token = hf_tok.eos_token
    model = build_ours(check.qwen, check.device, check.dtype).eval()
    hf = build_hf(check.qwen, check.device, check.dtype, ours=model).eval()
    emb = M.Embedder(model, tok, "mean", causal=False, max_length=check.max_len)

    @torch.no_grad()
    def naive():
        out = []
        for s in range(0, len(texts), batch):
            enc = hf_tok(texts[s:s + batch], padding=True, truncation=True, max_length=check.max_len,
                         return_tensors="pt").to(check.device)
            out.append(C.hf_mean_embed(hf, enc["input_ids"], enc["attention_mask"]).cpu().numpy())
        return np.concatenate(out)

    runs = {"ours": lambda: emb.encode(texts, batch_size=batch), "naive": naive}
    times, outs = {k: [] for k in runs}, {}
    for k in runs:
        outs[k] = runs[k]()  # warm-up
    for i in range(3):
        for k in runs if i % 2 == 0 else list(runs)[::-1]:
            sync(check.device)
            t = time.perf_counter()
            outs[k] = runs[k]()
            sync(check.device)
            times[k].append(time.perf_counter() - t)
    a, b = outs["ours"], outs["naive"]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    res = {k: len(texts) / C.median(v) for k, v in times.items()}
    res |= dict(min_cosine=float(cos.min()), n=len(texts), batch=batch, max_length=check.max_len)
    check.results["encode"] = res
    check.log(f"encode: ours {res['ours']:.1f} texts/s, naive {res['naive']:.1f} texts/s, "
              f"min cosine ours vs transformers {res['min_cosine']:.5f}")
    setting = f"{'Qwen2.5-0.5B' if not check.dry else 'tiny'} bf16, {len(texts)} SciFact docs, batch {batch}"
    check.row("encode texts/s", setting, f"{res['ours']:.1f}", f"{res['naive']:.1f}",
              f"{res['ours'] / res['naive']:.2f}")
    check.row("encode agreement", "min cosine ours vs transformers (bf16)", f"{res['min_cosine']:.5f}")


def cosines(a, b):
    import numpy as np
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def section_agreement(check):
    texts = C.scifact_texts(200 if not check.dry else 16)
    out = check.results.setdefault("bf16 vs fp32", {})
    # the bundled model, loaded in each dtype as a user would
    e32 = M.Embedder.from_pretrained(C.STORIES, device=check.device, dtype=torch.float32, max_length=check.max_len)
    e16 = M.Embedder.from_pretrained(C.STORIES, device=check.device, dtype=torch.bfloat16, max_length=check.max_len)
    cos = cosines(e32.encode(texts), e16.encode(texts))
    out["stories260K"] = dict(min=float(cos.min()), mean=float(cos.mean()))
    # a random Qwen2.5-0.5B shape, N(0, 0.02), fp32 then the same weights cast to bf16
    with tempfile.TemporaryDirectory() as tmp:
        tok = tokenizer.Tokenizer.from_dir(tokenizer_dir(check.qwen, tmp))
    model = build_ours(check.qwen, check.device, torch.float32, seed=1).eval()
    emb = M.Embedder(model, tok, "mean", causal=False, max_length=check.max_len)
    h32 = emb.encode(texts)
    model.to(torch.bfloat16)
    cos = cosines(h32, emb.encode(texts))
    out["random Qwen2.5-0.5B"] = dict(min=float(cos.min()), mean=float(cos.mean()))
    for name, r in out.items():
        ok = "pass" if r["min"] >= 0.999 else "FAIL"
        check.log(f"bf16 vs fp32, {name}: min cosine {r['min']:.6f}, mean {r['mean']:.6f} ({ok}: >= 0.999)")
        tiny = " (tiny)" if check.dry and "Qwen" in name else ""
        check.row("bf16 vs fp32 cosine", f"{name}{tiny}, {len(texts)} texts",
                  f"min {r['min']:.5f} mean {r['mean']:.5f} ({ok})")


def section_tests(check):
    try:
        import pytest  # noqa: F401
    except ImportError:
        check.notes.append("tests: pytest is not installed here; the CUDA tests were not run")
        check.row("CUDA tests", "skipped: no pytest")
        return
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", "tests/"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    limit = max(10, min(140, check.left() - 5))  # inside the section's 150 s time box
    check.log(f"running {' '.join(cmd)} (limit {limit:.0f} s)")
    try:
        res = subprocess.run(cmd, cwd=C.ROOT, capture_output=True, text=True, env=env, timeout=limit)
        text, code = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as e:
        text, code = f"{e.stdout or ''}{e.stderr or ''}\nTIMED OUT after {limit:.0f} s", "timeout"
    (check.out / "pytest_cuda.log").write_text(text if isinstance(text, str) else text.decode())
    last = [l for l in str(text).strip().splitlines() if l.strip()][-1:] or ["(no output)"]
    check.results["cuda tests"] = dict(returncode=code, summary=last[0])
    check.log(f"pytest -m cuda: exit {code}: {last[0]}")
    check.row("CUDA tests", "pytest -q -m cuda tests/", f"exit {code}: {last[0]}")


def section_env(check):
    import transformers
    info = dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                cuda=torch.version.cuda, transformers=transformers.__version__, device=device_name(check.device),
                dry_run=check.dry, cpu=C.cpu_model())
    if check.device.type == "cuda":
        p = torch.cuda.get_device_properties(check.device)
        info |= dict(capability=f"{p.major}.{p.minor}", memory_gb=p.total_memory / GB, sms=p.multi_processor_count)
    smi = shutil.which("nvidia-smi")
    text = json.dumps(info, indent=2) + "\n"
    if smi:
        text += subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout
    (check.out / "env.txt").write_text(text)
    check.results["env"] = info
    check.log(f"env: {json.dumps(info)}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the logs, results.json and summary.md")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (CI), under a minute")
    p.add_argument("--budget-s", type=float, default=None, help="total seconds (default 450; dry run 120)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s or (120 if args.dry_run else 450)
    if args.dry_run:
        torch.set_num_threads(1)
    check = Check(out, args.dry_run, budget)
    if not args.dry_run and check.device.type != "cuda":
        check.log("WARNING: no CUDA device; running the full shapes on CPU will not finish (use --dry-run)")
    check.log(f"gpu_check{' --dry-run' if args.dry_run else ''}: budget {budget:.0f} s, device {check.device}")
    scale = 0.25 if args.dry_run else 1.0  # shares and minimums of each section, seconds
    sections = [("env", section_env, 30, 1), ("train Qwen2.5-0.5B", section_train_small, 90, 20),
                ("train Llama-3-8B ckpt", section_train_8b, 150, 40), ("encode", section_encode, 90, 20),
                ("bf16 vs fp32", section_agreement, 60, 10), ("CUDA tests", section_tests, 150, 20),
                ("train Llama-3-8B no ckpt", section_train_8b_no_ckpt, 60, 20),
                ("train grouped", section_train_grouped, 90, 15), ("train compiled", section_train_compiled, 240, 60)]
    for name, fn, share, min_s in sections:
        run_section(check, name, fn, share * scale if name != "CUDA tests" else share, min_s * scale)
    table = check.save()
    check.log(f"finished in {time.time() - check.t0:.0f} s; logs in {out}")
    print("\n" + table)
    for n in check.notes:
        print(f"- {n}")


if __name__ == "__main__":
    main()
