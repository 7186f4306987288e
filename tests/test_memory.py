"""The memory plan (BENCHMARKS.md), checked in code: the stage-2 teacher is the student with its LoRA
off (no second copy of the weights), no [B, T, V] tensor is ever made in a training step (only the
pooled [B, V] logits), and loading holds one copy of the weights (meta-device build), measured as
peak resident memory in a subprocess.

Runs on CPU in seconds with tiny random Llamas (stories260K's tokenizer) written to tmp_path.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

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
