"""Shared pieces of the bench/ scripts: the machine line, result tables appended to BENCHMARKS.md,
medians, peak resident memory from /proc, and the transformers side of a comparison (its
bidirectional mask, mean pooling, and a hand-written LoRA of peft's shape, since peft is not a
dependency).

Dimensions: B batch, T tokens, D hidden, V vocabulary, r LoRA rank.

Not included: GPU timing helpers (gpu_check.py has its own), plotting.
"""

import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):  # model.py & co at the root; hf_reference.py under tests/
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
SCIFACT = ROOT / "data" / "scifact" / "corpus.jsonl"
STORIES = ROOT / "data" / "models" / "stories260K"
MISTRAL_TOKENIZER = ROOT / "tests" / "fixtures" / "configs" / "Mistral-7B-Instruct-v0.2"  # vocabulary 32000
# The random Llama of the CPU benchmarks (HF config keys): a few hundred ms per training step of
# 8 x 128 tokens on one CPU thread; vocabulary 32000 = Mistral's tokenizer (tests/fixtures)
BENCH_LLAMA = dict(model_type="llama", vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5,
                   rope_theta=10000.0, hidden_act="silu", bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -----------------------------------------------------------------------------
# Machine, tables, BENCHMARKS.md


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def quiet_transformers():
    """No progress bars or advisory warnings from transformers in the timed output."""
    import transformers
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def machine_line() -> str:
    import transformers
    return (f"{platform.platform()}; {cpu_model()} ({os.cpu_count()} logical CPUs); Python "
            f"{platform.python_version()}; torch {torch.__version__}; transformers {transformers.__version__}; "
            f"torch threads {torch.get_num_threads()}")


def format_table(headers, rows) -> str:
    """A markdown table; floats get 3 significant decimals."""
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(title, headers, rows, notes=(), write=True):
    """Print the table and append it to BENCHMARKS.md with the command, machine and date."""
    table = format_table(headers, rows)
    print(f"\n{title}\n{table}")
    for n in notes:
        print(f"  {n}")
    if not write:
        return
    command = "python " + " ".join([str(Path(sys.argv[0]).relative_to(ROOT)) if Path(sys.argv[0]).is_absolute()
                                    else sys.argv[0]] + sys.argv[1:])
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = (f"\n### {title} ({when})\n\n`{command}`  \n{machine_line()}\n\n{table}\n"
            + "".join(f"\n{n}" for n in notes) + ("\n" if notes else ""))
    with open(BENCHMARKS_MD, "a") as fh:
        fh.write(text)
    print(f"(appended to {BENCHMARKS_MD.name})")


def median(xs):
    return statistics.median(xs)


def alternate(runs, repeats):
    """{name: fn} run in turn `repeats` times (order reversed every other round) after one warm-up
    each -> ({name: median seconds}, {name: last result})."""
    out = {k: fn() for k, fn in runs.items()}
    times = {k: [] for k in runs}
    for i in range(repeats):
        for k in list(runs) if i % 2 == 0 else list(runs)[::-1]:
            t = time.perf_counter()
            out[k] = runs[k]()
            times[k].append(time.perf_counter() - t)
    return {k: median(v) for k, v in times.items()}, out


def scifact_texts(n):
    """The first n SciFact documents as title + " " + text (lengths skewed: a realistic corpus)."""
    texts = []
    with open(SCIFACT, encoding="utf-8") as fh:
        for line in fh:
            doc = json.loads(line)
            texts.append(f"{doc['title']} {doc['text']}")
            if len(texts) == n:
                break
    return texts


# -----------------------------------------------------------------------------
# Resident memory (Linux /proc): VmRSS now, VmHWM = peak since start or since reset_peak()


def _status_kib(key) -> int:
    m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1))


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (writing 5 to clear_refs, Linux >= 4.0). False where the
    kernel refuses; the caller then measures peak - baseline in a fresh process instead."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# -----------------------------------------------------------------------------
# The transformers side


def hf_padding_mask(attention_mask, dtype):
    """[B, T] (1 = real) -> additive [B, 1, T, T]: 0 on real keys, the dtype's minimum on padding;
    bidirectional (transformers passes a prepared 4-D mask to attention as it is)."""
    B, T = attention_mask.shape
    keys = attention_mask.bool()[:, None, None, :].expand(B, 1, T, T)
    return torch.zeros(B, 1, T, T, dtype=dtype, device=attention_mask.device).masked_fill(
        ~keys, torch.finfo(dtype).min)


def hf_mean_embed(hf, input_ids, attention_mask):
    """transformers' bidirectional last hidden states, mean-pooled in fp32 -> [B, D]."""
    mask4 = hf_padding_mask(attention_mask, hf.dtype)
    h = hf.model(input_ids=input_ids, attention_mask=mask4).last_hidden_state  # [B, T, D]
    m = attention_mask.float().unsqueeze(-1)  # [B, T, 1]
    return (h.float() * m).sum(1) / m.sum(1).clamp(min=1.0)


class PeftStyleLoRA(nn.Module):
    """What peft's lora.Linear computes: base(x) + lora_B(lora_A(dropout(x))) * alpha / r, with
    lora_A / lora_B as bias-free nn.Linear (weights [r, in] and [out, r], as ours)."""

    def __init__(self, base: nn.Linear, r, alpha, dropout):
        super().__init__()
        self.base = base
        dev = base.weight.device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def hf_add_lora(hf, r=16, alpha=32, dropout=0.05, targets=LORA_TARGETS):
    """Wrap the named nn.Linear modules of a transformers model; freeze the rest.
    -> {our parameter name prefix: PeftStyleLoRA}, e.g. 'layers.0.self_attn.q_proj'."""
    wrapped = {}
    for name, module in list(hf.model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                lora = PeftStyleLoRA(child, r, alpha, dropout)
                setattr(module, child_name, lora)
                wrapped[f"{name}.{child_name}" if name else child_name] = lora
    for n, p in hf.named_parameters():
        p.requires_grad = ".lora_" in n
    return wrapped


@torch.no_grad()
def copy_lora(ours, wrapped):
    """Give the transformers side the same adapter values as ours (same A and B)."""
    mods = dict(ours.named_modules())
    for name, lora in wrapped.items():
        lora.lora_A.weight.copy_(mods[name].lora_A)
        lora.lora_B.weight.copy_(mods[name].lora_B)


def sparse_uniform_target(B, V, k, seed=0, device="cpu"):
    """B rows of k distinct random ids with weight 1/k (the shape of a stage-1 target)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(B)])  # [B, k]
    return ids.to(device), torch.full((B, k), 1.0 / k, device=device)


def reference_kl(logits, ids, w):
    """KL(q || softmax(logits)) for a sparse q without empty slots, written out: the reference
    side's loss (ours is targets.kl_loss)."""
    logp = F.log_softmax(logits.float(), dim=-1)  # [B, V]
    return (w * (w.log() - logp.gather(-1, ids))).sum() / logits.shape[0]


def random_lengths_batch(B, T, vocab, seed=0, min_len=None, device="cpu"):
    """Random ids [B, T] (BOS first) and a right-padding mask [B, T] bool with lengths spread
    between min_len (default T/4) and T; the longest row is full."""
    g = torch.Generator().manual_seed(seed)
    lo = min_len or max(1, T // 4)
    lengths = torch.randint(lo, T + 1, (B,), generator=g)
    lengths[0] = T
    ids = torch.randint(3, vocab, (B, T), generator=g)
    ids[:, 0] = 1
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return ids.to(device), mask.to(device)


# -----------------------------------------------------------------------------
# Our training step outside t2t.py's loop, for variants that alternate step by step


def t2t_args(argv):
    """t2t.py train's flags (defaults, preset and all) parsed from a list, as the command line does."""
    import t2t
    argv = [str(a) for a in argv]
    p = t2t.argparse.ArgumentParser()
    t2t.train_parser(p)
    return t2t.apply_preset(p.parse_args(argv), argv)


def texts_file(n, folder, source=None):
    """The first n lines of the bundled Wikipedia sample (or `source`) written to folder/texts.txt."""
    import t2t
    lines = Path(source or t2t.DEFAULT_DATA).read_text(encoding="utf-8").splitlines()[:n]
    path = Path(folder) / "texts.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class Stage1Steps:
    """One stage-1 optimizer step of t2t.py train, outside its loop: the same model set-up
    (t2t.build_student: frozen base in the autocast dtype, fp32 LoRA, --compile), targets, length-
    grouped batches (t2t.BatchPlan), autocast, loss and AdamW; no checkpoints, logging or
    distribution. Two instances built from the same flags get the same adapters and batches, so
    variants (eager/compiled, fp32/bf16) can alternate step by step in one process."""

    def __init__(self, argv, device="cpu"):
        import runs
        import t2t
        import model as M
        args = self.args = t2t_args(argv)
        self.device = torch.device(device)
        self.precision = t2t.resolve_precision(args.precision, self.device)
        torch.manual_seed(args.seed)  # as t2t.train_stage: the adapters' init
        if self.device.type == "cpu":
            runs.mmap_large_allocations()  # as t2t.train_loop
        quiet = lambda msg: None  # noqa: E731
        t2t.embedding_flags(args, quiet)  # stage 1: bidirectional, mean unless given
        self.model, tok, self.params, _ = t2t.build_student(args, self.device, self.precision, quiet)
        self.emb = M.Embedder(self.model, tok, args.pooling, args.attention == "causal", args.max_length, args.prompt)
        texts, self.tgt_ids, self.tgt_w = t2t.stage1_targets(args, t2t.read_texts(args.data), tok, quiet)
        self.tokenized = tok.encode_with_prompt(texts, self.emb.prompt, args.max_length)
        lengths = [len(ids) for ids, _ in self.tokenized] if args.group_by_length else None
        self.plan = t2t.BatchPlan(len(texts), args.batch_size, args.seed, lengths, args.group_by_length)
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=args.weight_decay, fused=self.device.type == "cuda")
        self.model.train()

    def batch(self, position):
        return self.rows(self.plan(position))

    def rows(self, idx):
        """Text indices -> ids, attention mask, pool mask [B, T] and the sparse target, on the device."""
        import model as M
        ids, att, sub = M.pad_batch([self.tokenized[i][0] for i in idx], self.emb.tokenizer.pad_id,
                                    [self.tokenized[i][1] for i in idx])
        target = (self.tgt_ids[idx].long().to(self.device), self.tgt_w[idx].to(self.device))
        return ids.to(self.device), att.to(self.device), sub.to(self.device), target

    def loss(self, ids, att, sub, target):
        import t2t
        import targets as T
        with t2t.autocast_ctx(self.precision, self.device):
            h = self.emb.embed_ids(ids, att, sub)  # [B, D] fp32
        return T.kl_loss(self.model.token_logits(h), target)

    def step(self, position, max_tokens=None):
        """Optimizer step on global batch `position` -> (loss, real tokens)."""
        return self.step_on(self.plan(position), max_tokens)

    def step_on(self, batch, max_tokens=None):
        """Optimizer step on the texts `batch` (indices), in row chunks of at most max_tokens positions
        as t2t.train_loop runs them (default: t2t.max_batch_tokens, 1024 on CPU; 0 = whole) -> (loss,
        real tokens)."""
        import t2t
        max_tokens = t2t.max_batch_tokens(self.args, self.device) if max_tokens is None else max_tokens
        loss_sum, n_tok = 0.0, 0
        for rows in t2t.row_chunks([len(self.tokenized[i][0]) for i in batch], max_tokens):
            idx = [batch[j] for j in rows]
            ids, att, sub, target = self.rows(idx)
            loss = self.loss(ids, att, sub, target) * (len(idx) / len(batch))
            loss.backward()
            loss_sum, n_tok = loss_sum + float(loss.detach()), n_tok + int(att.sum())
        torch.nn.utils.clip_grad_norm_(self.params, self.args.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss_sum, n_tok


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def fresh_inductor_cache(folder):
    """Point inductor's on-disk caches at an empty folder, so that a compile time measured here is
    what a first run pays (later runs of the same graphs hit the cache and compile faster)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ["TRITON_CACHE_DIR"] = str(Path(folder) / "triton")
