"""The memory plan (BENCHMARKS.md), checked in code: the stage-2 teacher is the student with its LoRA
off (no second copy of the weights), no [B, T, V] tensor is ever made in a training step (only the
pooled [B, V] logits), loading holds one copy of the weights (meta-device build), measured as
peak resident memory in a subprocess, a training step saves for backward what the analytic count
of its layers says (saved-tensor hooks), no more, and a micro-batch run in row chunks
(--max-batch-tokens) gets the whole micro-batch's loss and gradient.

Runs on CPU in seconds with tiny random Llamas (stories260K's tokenizer) written to tmp_path.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoints  # noqa: E402
import model as M  # noqa: E402
import t2t  # noqa: E402

STORIES = ROOT / "data" / "models" / "stories260K"
WIKI = ROOT / "data" / "wiki1m_sample" / "wiki1m_for_simcse.head11913.txt"
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def random_llama(path, dim=64, layers=2, vocab=512, ffn=None, max_shard_bytes=5 * 2**30, seed=0):
    """A random Llama checkpoint folder written by checkpoints.save_hf (stories260K's tokenizer)."""
    cfg = json.loads((STORIES / "config.json").read_text()) | dict(
        hidden_size=dim, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=ffn or 2 * dim, tie_word_embeddings=False, head_dim=dim // 4, vocab_size=vocab)
    torch.manual_seed(seed)
    m = M.Transformer(M.args_from_config(cfg))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    checkpoints.save_hf(m, STORIES, path, {}, max_shard_bytes=max_shard_bytes)
    (Path(path) / "config.json").write_text(json.dumps(cfg))
    return Path(path)


def corpus(tmp_path, n=16):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(WIKI.read_text().splitlines()[:n]) + "\n")
    return path


def parse(argv):
    argv = [str(a) for a in argv]
    p = t2t.argparse.ArgumentParser()
    t2t.train_parser(p)
    return p.parse_args(argv)


def storages(*modules) -> dict:
    """data_ptr -> bytes of every distinct parameter storage (a tied weight counts once)."""
    out = {}
    for m in modules:
        for p in m.parameters():
            out[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return out


# -----------------------------------------------------------------------------
# (a) the stage-2 teacher holds no second copy


def test_stage2_teacher_is_the_student_with_lora_off(tmp_path):
    base = random_llama(tmp_path / "base")
    data = corpus(tmp_path)
    ckpt_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))  # fp32: ~ the weights' bytes
    common = ["--model", base, "--data", data, "--batch-size", 4, "--max-steps", 1, "--max-length", 32]
    s1 = t2t.train(parse(common + ["--out", tmp_path / "s1", "--lora-r", 4]))

    args = parse(common + ["--stage", 2, "--init", s1, "--out", tmp_path / "s2", "--lora-r", 4])
    student, _, params, teacher = t2t.build_student(args, torch.device("cpu"), "fp32", print)
    assert teacher is None
    lora_bytes = sum(p.numel() * p.element_size() for p in params)
    held = storages(student)
    assert len(held) == len(list(student.parameters()))  # no two parameters share (or copy) storage
    assert sum(held.values()) - lora_bytes <= ckpt_bytes  # the base weights once, plus the adapter
    # the control: full fine-tuning keeps a frozen copy, and the same count sees it
    args_ft = parse(common + ["--stage", 2, "--init", s1, "--out", tmp_path / "s2ft", "--lora-r", 0])
    student_ft, _, _, teacher_ft = t2t.build_student(args_ft, torch.device("cpu"), "fp32", print)
    both = storages(student_ft, teacher_ft)
    assert not set(storages(student_ft)) & set(storages(teacher_ft))
    assert sum(both.values()) >= 1.9 * ckpt_bytes


# -----------------------------------------------------------------------------
# (b) no [B, T, V] tensor in a training step


class ShapeRecorder(TorchDispatchMode):
    """Records (op name, shape) of every tensor an aten op returns, forward and backward."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.seen.append((str(func), tuple(t.shape)))
        return out


def full_vocab_per_token(seen, V, B, D):
    """Tensors with the vocabulary in their shape that are bigger than [max(B, D), V]: a [B, T, V]
    or [B*T, V] tensor (the LM head applied to every token) and nothing else."""
    return [(op, s) for op, s in seen
            if V in s and (len(s) >= 3 or torch.Size(s).numel() > V * max(B, D))]


def test_training_step_never_builds_logits_for_every_token(tmp_path):
    V, B, D = 512, 4, 64
    base = random_llama(tmp_path / "base", dim=D, vocab=V)
    data = corpus(tmp_path)
    common = ["--model", base, "--data", data, "--batch-size", B, "--max-steps", 1, "--max-length", 32,
              "--lora-r", 4]
    rec = ShapeRecorder()
    with rec:  # stage 1, then stage 2 with the teacher on the fly (background pass included)
        s1 = t2t.train(parse(common + ["--out", tmp_path / "s1"]))
        t2t.train(parse(common + ["--stage", 2, "--init", s1, "--out", tmp_path / "s2", "--tau", 0.1]))
    ops = {op for op, _ in rec.seen}
    assert "aten.silu_backward.default" in ops  # the backward pass was recorded too
    assert any(s == (B, V) for _, s in rec.seen)  # the pooled logits were
    assert any(len(s) == 3 and s[1] == 32 for _, s in rec.seen)  # and [B, T=32, D] hidden states
    assert full_vocab_per_token(rec.seen, V, B, D) == []
    # the control: the LM head applied to every token's hidden state is caught
    model, tok = M.load(base)
    ids, mask = tok.batch(WIKI.read_text().splitlines()[:B], max_length=32)
    bad = ShapeRecorder()
    with bad:
        model.token_logits(model(ids, mask)).sum().backward()
    assert full_vocab_per_token(bad.seen, V, B, D)


# -----------------------------------------------------------------------------
# (c) loading holds one copy of the weights


def load_child(side, path):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_load.py"), "--child", side, "--ckpt", str(path)],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_load_peak_memory_is_one_copy(tmp_path):
    # ~100 MB in fp32 (26M parameters), 2 shards
    path = random_llama(tmp_path / "ckpt", dim=512, layers=4, vocab=16000, ffn=1376, max_shard_bytes=60 * 2**20)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert 90e6 < size < 130e6 and len(list(path.glob("*.safetensors"))) == 2
    ours = load_child("ours", path)  # peak above the RSS after imports, all weights read once
    assert ours["peak"] <= 1.3 * size, (ours, size)
    assert ours["peak"] >= 0.9 * size  # every weight was really read (the measurement sees them)
    naive = load_child("naive", path)  # the control: build the model, then copy the file into it
    assert naive["peak"] >= 1.5 * size, (naive, size)


# -----------------------------------------------------------------------------
# (d) what a training step saves for backward


class SavedBytes:
    """Bytes autograd saves for backward (torch.autograd.graph.saved_tensors_hooks), once per storage,
    parameters excluded, by the decoder layer that was running (-1: outside the layers)."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen, self.layer = set(), -1
        self.by_layer = {}
        for i, layer in enumerate(model.layers):
            layer.register_forward_pre_hook(lambda m, a, i=i: setattr(self, "layer", i))
            layer.register_forward_hook(lambda m, a, o: setattr(self, "layer", -1))

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.params and ptr not in self.seen:
            self.seen.add(ptr)
            self.by_layer[self.layer] = self.by_layer.get(self.layer, 0) + t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        return self.ctx.__enter__()

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)


def layer_bytes_per_token(a, r) -> int:
    """fp32 bytes one decoder layer saves per token position (padding included) in a LoRA step with
    dropout, counted from the code (model.py):
      2 RMSNorms: the fp32 input (D floats) and its inverse norm (1)
      7 LoRA projections: the dropped input (in floats), the bool keep-mask (in bytes), the rank-r
        activations (r floats); q, k, v, gate, up read D features, o reads H*hd, down F
      SDPA (flash on CPU, grouped-query attention inside the kernel): q and its output (H*hd floats
        each), k and v (K*hd each: kv heads not repeated) and the log-sum-exp (H)
      MLP: gate's output (silu's input), silu's output and up's output (F floats each)."""
    ins = [a.dim] * 5 + [a.n_heads * a.head_dim, a.ffn_dim]
    norms = 2 * 4 * (a.dim + 1)
    lora = sum(4 * i + i + 4 * r for i in ins)
    attention = 4 * (2 * a.n_heads * a.head_dim + 2 * a.n_kv_heads * a.head_dim + a.n_heads)
    mlp = 3 * 4 * a.ffn_dim
    return norms + lora + attention + mlp


def test_training_step_saves_what_the_layers_need(tmp_path):
    base = random_llama(tmp_path / "base", dim=64, layers=3, vocab=512, ffn=176)
    args = parse(["--model", base, "--data", corpus(tmp_path), "--out", tmp_path / "out", "--lora-r", 4])
    t2t.embedding_flags(args, print)
    student, tok, _, _ = t2t.build_student(args, torch.device("cpu"), "fp32", print)
    student.train()
    emb = M.Embedder(student, tok, args.pooling, args.attention == "causal", args.max_length, args.prompt)
    ids, att = tok.batch(WIKI.read_text().splitlines()[:8], max_length=32)  # [8, 32]
    saved = SavedBytes(student)
    with saved:  # the training loop's forward (t2t.backward_batch)
        h = emb.embed_ids(ids, att, att)
        student.token_logits(h).logsumexp(-1).sum().backward()
    expected = layer_bytes_per_token(student.args, 4) * ids.numel()
    # layers 1 and 2 hold their own tensors only (measured: 1.0006 x the count, within 2%; layer 0 saves less,
    # since the embedding output it reads needs no gradient)
    for i in (1, 2):
        assert 0.98 * expected <= saved.by_layer[i] <= 1.02 * expected, (i, saved.by_layer[i] / expected)
    # the controls: the keep-mask saved in fp32 again (x * mask.float(): 3 more bytes per LoRA input
    # feature) and the kv heads repeated to H are each more than the bounds allow (as is a doubled step)
    a, n = student.args, layer_bytes_per_token(student.args, 4)
    assert n + 3 * (6 * a.dim + a.ffn_dim) > 1.02 * n
    assert n + 2 * 4 * (a.n_heads - a.n_kv_heads) * a.head_dim > 1.02 * n


def test_head_cast_in_backward_is_the_fp32_product():
    # HeadFP32: a frozen bf16 head's logits and the gradient of h, without keeping W.float()
    torch.manual_seed(0)
    w = torch.randn(300, 16).bfloat16()
    h = torch.randn(4, 16, requires_grad=True)
    g = torch.randn(4, 300)
    logits = M.HeadFP32.apply(h, w)
    (grad,) = torch.autograd.grad(logits, h, g)
    h2 = h.detach().clone().requires_grad_()
    ref = torch.nn.functional.linear(h2, w.float())
    (grad_ref,) = torch.autograd.grad(ref, h2, g)
    assert torch.equal(logits, ref) and torch.equal(grad, grad_ref)


# -----------------------------------------------------------------------------
# (e) a micro-batch in row chunks: the same loss and gradient


def test_row_chunks_bound_positions():
    assert t2t.row_chunks([5, 3, 9, 2], 0) == [[0, 1, 2, 3]]  # 0: one chunk
    assert t2t.row_chunks([5, 3, 9, 2], 18) == [[0, 1], [2, 3]]  # 2 x 5, then 2 x 9
    assert t2t.row_chunks([5, 3, 9, 2], 4) == [[0], [1], [2], [3]]  # a longer text still runs, alone
    for lengths, n in [([7, 1, 30, 12, 12, 3], 25), ([4] * 10, 12)]:
        chunks = t2t.row_chunks(lengths, n)
        assert sum(chunks, []) == list(range(len(lengths)))  # every row once, in order
        assert all(len(c) == 1 or len(c) * max(lengths[j] for j in c) <= n for c in chunks)


@pytest.mark.parametrize("stage", [1, 2])
def test_chunked_micro_batch_has_the_whole_gradient(tmp_path, stage):
    base = random_llama(tmp_path / "base", dim=64, layers=2, vocab=512)
    args = parse(["--model", base, "--data", corpus(tmp_path), "--out", tmp_path / "out", "--lora-r", 4,
                  "--lora-dropout", 0, "--grad-accum", 2, "--tau", 0.1])  # dropout 0: no draws to differ
    t2t.embedding_flags(args, print)
    model, tok, params, _ = t2t.build_student(args, torch.device("cpu"), "fp32", print)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)  # lora_B starts at zero; make the adapter matter
    model.train()
    emb = M.Embedder(model, tok, args.pooling, False, 32, None)
    texts, tgt_ids, tgt_w = t2t.stage1_targets(args, t2t.read_texts(args.data), tok, print)
    s = SimpleNamespace(model=model, emb=emb, device=torch.device("cpu"), precision="fp32",
                        tokenized=tok.encode_with_prompt(texts, None, 32), tgt_ids=tgt_ids, tgt_w=tgt_w,
                        teacher=None, theta=None)
    if stage == 2:  # targets from the teacher (the student with its adapter off), on the fly
        s.tgt_ids = s.tgt_w = None
        s.teacher, s.theta = emb, torch.randn(512)
    batch = list(range(10))
    lengths = [len(s.tokenized[i][0]) for i in batch]
    assert len(t2t.row_chunks(lengths, 3 * max(lengths))) >= 3  # the split run really is split

    def run(max_tokens, rows=batch):
        out = t2t.backward_batch(args, s, rows, max_tokens)
        grads = torch.cat([p.grad.flatten() for p in params])
        for p in params:
            p.grad = None
        return out, grads

    (loss, ent, n_tok, _), whole = run(0)
    (loss_c, ent_c, n_tok_c, _), split = run(3 * max(lengths))
    assert n_tok_c == n_tok and abs(loss_c - loss) <= 1e-6 * loss and abs(ent_c - ent) <= 1e-6 * ent
    scale = float(whole.abs().max())
    assert scale > 1e-5  # gradients that mean something
    assert float((split - whole).abs().max()) <= 1e-6 * scale
    # the control: chunks weighted equally (each one's mean as if it were a micro-batch) are caught
    chunks = [[batch[j] for j in c] for c in t2t.row_chunks(lengths, 3 * max(lengths))]
    equal = sum(run(0, c)[1] for c in chunks) / len(chunks)
    assert float((equal - whole).abs().max()) > 1e-3 * scale
