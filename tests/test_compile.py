"""torch.compile (model.compile_layers; t2t.py train --compile, Embedder.compile): the compiled
layers compute what the eager ones do, the graphs stay few whatever the batch shapes (training,
the stage-2 teacher with the adapter off, encoding), dropout draws the same masks compiled or
not, and a compiled run that is interrupted and resumed ends where an uninterrupted compiled
run ends (and where an eager run ends, within rounding).

Inductor (the default backend) compiles C++ kernels on CPU: tens of seconds the first time, less
once its on-disk cache holds them. Tests that need inductor's kernels are marked slow; the graph
count and the training mechanics use backend="aot_eager" (dynamo and AOTAutograd without code
generation: the same graphs and guards, in seconds), or "eager" (dynamo alone: the guards that
decide what recompiles).

Tolerances (fp32, stated at each assert): inductor fuses and reorders float sums, so hidden
states agree with eager to ~1e-6 relative, gradients to ~1e-5.
"""

import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoints  # noqa: E402
import model as M  # noqa: E402
import t2t  # noqa: E402
from test_runs import assert_same_run, baseline, common_flags, run_and_crash  # noqa: E402
from test_train import ENV, corpus, losses, parse, tiny_llama  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with no compiled code and zeroed counters (dynamo's caches are global)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def tiny_model(seed=0, lora=True):
    """The tiny Llama of test_train (2 layers, D 64, GQA) in memory, with a LoRA whose B is nonzero
    (a zero B would leave the adapter's path out of every comparison) and dropout off."""
    args = M.args_from_config(dict(model_type="llama", vocab_size=512, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=128))
    torch.manual_seed(seed)
    model = M.Transformer(args)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    if lora:
        M.add_lora(model, r=4, alpha=8, dropout=0.0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    return model


def batch(B, T, seed):
    """Random ids [B, T] and a right-padding mask with one short row (lengths differ)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[-1, max(1, T // 3):] = False
    return ids, mask


def loss_and_grads(model, ids, mask, causal=False):
    """Mean-pooled hidden states through the LM head, a logsumexp loss -> (h, loss, LoRA grads)."""
    model.zero_grad(set_to_none=True)
    h = model(ids, mask, causal=causal)  # [B, T, D]
    loss = model.token_logits(M.mean_pool(h, mask)).logsumexp(-1).mean()
    loss.backward()
    return h.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def graphs():
    """Distinct graphs dynamo has compiled so far (each recompilation adds one)."""
    return counters["stats"]["unique_graphs"]


# -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_inductor_matches_eager_forward_backward_and_encoding(causal):
    eager, compiled = tiny_model(), tiny_model()
    M.compile_layers(compiled)
    for T in (9, 16, 5):  # a new T each step: dynamic shapes, one graph
        ids, mask = batch(4, T, seed=T)
        h_e, loss_e, g_e = loss_and_grads(eager, ids, mask, causal)
        h_c, loss_c, g_c = loss_and_grads(compiled, ids, mask, causal)
        # fp32: hidden states within 1e-5 absolute (values are O(1)), gradients within 1e-4 relative
        torch.testing.assert_close(h_c, h_e, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
        assert set(g_c) == set(g_e) and len(g_e) == 2 * 7 * 2  # A and B of 7 adapters in 2 layers
        for n in g_e:
            torch.testing.assert_close(g_c[n], g_e[n], atol=1e-6, rtol=1e-4, msg=n)
        with torch.no_grad(), M.lora_enabled(eager, False), M.lora_enabled(compiled, False):  # the teacher
            torch.testing.assert_close(compiled(ids, mask, causal), eager(ids, mask, causal), atol=1e-5, rtol=1e-5)
    # encoding (eval, no_grad, length-sorted batches of every T): the same embeddings
    tok = checkpoints.load_tokenizer(ROOT / "data" / "models" / "stories260K")
    texts = [line for line in (ROOT / "data" / "stsbenchmark" / "sts-dev.csv").read_text().splitlines()[:40]]
    a = M.Embedder(eager, tok, causal=causal, max_length=64).encode(texts, batch_size=8)
    b = M.Embedder(compiled, tok, causal=causal, max_length=64).compile().encode(texts, batch_size=8)
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)


def test_graphs_stay_few_across_shapes_teacher_and_eval():
    """Stage-2 style steps with a new T every step: student (adapter on, gradients), teacher
    (adapter off, no_grad), then encoding. Dynamo compiles one graph per mode, never one per
    shape: the count after 2 steps is the count after 8, and encoding adds at most its own."""
    model = M.compile_layers(tiny_model(), backend="eager")  # dynamo alone decides what recompiles
    model.train()
    counts = []
    for step, T in enumerate((7, 12, 9, 30, 5, 16, 3, 21)):
        ids, mask = batch(4, T, seed=step)
        with torch.no_grad(), M.lora_enabled(model, False):
            model(ids, mask)  # the teacher
        loss_and_grads(model, ids, mask)  # the student
        counts.append(graphs())
    # training: layer 0 (its input needs no gradient), layers 1.. (theirs do); teacher: one more
    assert counts[1] == counts[-1] <= 3, counts
    assert counters["stats"]["calls_captured"] > 0 and not counters["graph_break"], dict(counters["graph_break"])
    tok = checkpoints.load_tokenizer(ROOT / "data" / "models" / "stories260K")
    texts = (ROOT / "data" / "stsbenchmark" / "sts-dev.csv").read_text().splitlines()[:50]
    emb = M.Embedder(model, tok, max_length=48)
    emb.encode(texts, batch_size=8)  # 7 batches, each its own T, the last of 2 texts
    after_encode = graphs()
    emb.encode(texts[:18], batch_size=4)  # new B and T, none of them 1: nothing new
    assert graphs() == after_encode <= counts[-1] + 2, (counts, after_encode, graphs())


def test_compiled_dropout_and_checkpointing_match_eager():
    """Dropout's masks come from a custom op (model.keep_mask) that compiled code calls as it is: a
    compiled step with dropout on equals the eager step from the same RNG state, also with
    gradient checkpointing around the compiled layers (which recomputes them in backward)."""
    eager, compiled = tiny_model(), tiny_model()
    M.compile_layers(compiled, backend="aot_eager")
    for model in (eager, compiled):
        for m in model.modules():
            if isinstance(m, M.Dropout16):
                m.cut, m.scale = round(0.5 * 65536), 2.0  # p = 0.5: a wrong mask shows
        model.grad_checkpointing = True
        model.train()
    ids, mask = batch(4, 11, seed=1)
    results = []
    for model in (eager, compiled, compiled):
        torch.manual_seed(7)
        results.append(loss_and_grads(model, ids, mask))
    (_, loss_e, g_e), (_, loss_c, g_c), (_, loss_again, _) = results
    torch.testing.assert_close(loss_c, loss_e, atol=1e-6, rtol=1e-6)
    for n in g_e:
        torch.testing.assert_close(g_c[n], g_e[n], atol=1e-6, rtol=1e-5, msg=n)
    assert loss_again == loss_c  # the RNG state decides the masks
    torch.manual_seed(8)
    assert loss_and_grads(compiled, ids, mask)[1] != loss_c  # another state, other masks
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_t2t_compile_flag_trains_and_resumes_exactly(tmp_path, monkeypatch):
    """--compile end to end (backend aot_eager): a run that dies during step 5 and resumes from
    its step-3 checkpoint ends with the same adapter and losses as the uninterrupted run."""
    monkeypatch.setattr(M, "compile_layers", functools.partial(M.compile_layers, backend="aot_eager"))
    model, data = tiny_llama(tmp_path), corpus(tmp_path, 64)
    common = common_flags(model, data, steps=8) + ["--save-every", 3, "--compile"]
    full, out = run_and_crash(tmp_path, monkeypatch, common, step=5)
    monkeypatch.setattr(M, "compile_layers", functools.partial(M.compile_layers, backend="aot_eager"))
    t2t.train(parse(common + ["--out", out, "--resume"]))
    assert_same_run(full, out)  # the RNG states restored: the same dropout masks after the resume
    # and the compiled run is the eager run (dropout 0.05 on: the masks are the same draws)
    assert_same_run(baseline(common_flags(model, data, steps=8) + ["--out", tmp_path / "eager"]), full, atol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_run_resumes_exactly(tmp_path, monkeypatch):
    """The same with inductor's kernels: resumed == uninterrupted, and both == eager within
    inductor's rounding (fused, reordered float sums: 1e-5 on the losses and the adapter)."""
    model, data = tiny_llama(tmp_path), corpus(tmp_path, 64)
    common = common_flags(model, data, steps=8) + ["--save-every", 3, "--compile"]
    full, out = run_and_crash(tmp_path, monkeypatch, common, step=5)
    t2t.train(parse(common + ["--out", out, "--resume"]))
    assert_same_run(full, out)
    assert_same_run(baseline(common_flags(model, data, steps=8) + ["--out", tmp_path / "eager"]), full, atol=1e-5)


@pytest.mark.slow
def test_gloo_two_processes_with_compile_match_one_process(tmp_path):
    data = corpus(tmp_path, 64)
    common = ["--data", data, "--max-steps", 4, "--lora-r", 0, "--lr", 1e-3, "--precision", "fp32", "--seed", 1,
              "--compile"]
    one = subprocess.run([sys.executable, str(ROOT / "t2t.py"), "train", *map(str, common), "--batch-size", "8",
                          "--out", str(tmp_path / "one")], capture_output=True, text=True, env=ENV, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29527", str(ROOT / "t2t.py"), "train", *map(str, common), "--batch-size", "4",
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, env=ENV, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    # as test_gloo_two_processes_match_one_process (eager): all-reduce order and per-rank kernels
    # (B 4 instead of 8) move the result by rounding only
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
