"""Tests of model.py against references: transformers' modeling code (tiny random checkpoints of
every supported family, and shrunk copies of real configs), real checkpoint metadata (configs,
tokenizers, a sharded index; tests/fixtures/configs/SOURCES.md), the sample that llama2.c
published for stories260K, and properties: batching/padding invariance of the embedder,
causal vs bidirectional attention, prompts, LoRA, dtypes and error messages.

All on CPU in fp32 unless a test says otherwise; tiny checkpoints are written to tmp_path by
tests/hf_reference.py.
"""

import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
for p in (ROOT, TESTS):  # model.py is at the repo root; tests run from any directory
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import hf_reference as ref  # noqa: E402  (imports transformers only inside its functions)
import checkpoints  # noqa: E402
import model  # noqa: E402
import tokenizer  # noqa: E402

STORIES = ROOT / "data" / "models" / "stories260K"
CONFIGS = TESTS / "fixtures" / "configs"
PARITY_TOL = 1e-4  # fp32, ours vs transformers
INVARIANCE_TOL = 1e-5  # fp32, the same text in different batches, relative: see scaled_error
GRAD_TOL = 1e-6  # gradient checkpointing vs plain backward

# llama2.c, doc/stories260K.md: the sample from greedy decoding of stories260K starting at BOS
PUBLISHED_SAMPLE = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
                    "park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.")
# Jiang et al. 2023 (PromptEOL), as the paper's last-token setting uses it
PROMPT_EOL = 'This sentence : "{text}" means in one word:"'


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def load_stories():
    return model.load(STORIES)


def scaled_error(a, b) -> float:
    """max |a - b| / max(1, max |b|). fp32 rounding grows with the size of the values, and
    stories260K's final hidden states reach |h| ~ 13: the same text padded to another length
    differs there by up to ~1e-5 absolute (~7e-7 relative) from summation order alone."""
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
# Parity with transformers on tiny random checkpoints of every family

PARITY_CASES = [  # family, max_shard_size (None: one model.safetensors), config.json as transformers v5 writes it
    ("llama", None, False),
    ("llama3_rope", "40KB", False),
    ("llama_linear_rope", None, True),
    ("llama_tied_bias", "40KB", True),
    ("mistral", None, False),
    ("qwen2", "40KB", False),
    ("qwen3", "40KB", True),
]


@pytest.mark.parametrize("family,shard,v5", PARITY_CASES, ids=[c[0] for c in PARITY_CASES])
def test_forward_matches_transformers(transformers, tmp_path, family, shard, v5):
    path = ref.make_tiny_checkpoint(tmp_path, family, max_shard_size=shard, v5_config=v5)
    cfg = json.loads((path / "config.json").read_text())
    assert ("rope_parameters" in cfg) == v5
    files = checkpoints.weight_files(path)
    if shard:  # really sharded, through the index
        assert (path / "model.safetensors.index.json").is_file() and len(files) > 1
    else:
        assert [f.name for f in files] == ["model.safetensors"]
    errors = ref.parity_errors(path)
    assert max(errors.values()) <= PARITY_TOL, errors


def test_parity_check_detects_mistakes(transformers, tmp_path):
    """The tolerance is tight enough to see a wrong rope scaling or the wrong attention kind."""
    path = ref.make_tiny_checkpoint(tmp_path, "llama3_rope")
    ours, _ = model.load(path)
    hf = ref.load_hf(path)
    ids, mask = ref.random_batch([16, 9])
    real = mask.bool()
    with torch.no_grad():
        causal_ref = ref.hf_hidden_states(hf, ids, mask, causal=True)[real]
        bidir_ref = ref.hf_hidden_states(hf, ids, mask, causal=False)[real]
        assert (ours(ids, mask, causal=False)[real] - causal_ref).abs().max() > 100 * PARITY_TOL
        assert (ours(ids, mask, causal=True)[real] - bidir_ref).abs().max() > 100 * PARITY_TOL
        ours.args.rope_type = "default"  # llama3 scaling switched off
        assert (ours(ids, mask, causal=True)[real] - causal_ref).abs().max() > 100 * PARITY_TOL


def test_tied_checkpoint_shares_head_and_embedding(transformers, tmp_path):
    path = ref.make_tiny_checkpoint(tmp_path, "qwen3")  # tie_word_embeddings true
    keys = set()
    for f in checkpoints.weight_files(path):
        with safe_open(str(f), framework="pt") as fh:
            keys |= set(fh.keys())
    assert "lm_head.weight" not in keys
    ours, _ = model.load(path)
    assert ours.lm_head.weight is ours.embed_tokens.weight


# -----------------------------------------------------------------------------
# Real checkpoint metadata

REAL_CONFIGS = sorted(str(p.parent.relative_to(CONFIGS)) for p in CONFIGS.rglob("config.json"))

# What each published config means, from tests/fixtures/configs/SOURCES.md (not from our code):
# dim, layers, heads, kv heads, head_dim, ffn, vocab, rope_theta, rope type, rope factor, tie,
# q/k/v bias, q/k norm, sliding window
_L3_8B = (4096, 32, 32, 8, 128, 14336, 128256, 500000.0)
_L32_1B = (2048, 16, 32, 8, 64, 8192, 128256, 500000.0)
EXPECTED_ARGS = {
    "Meta-Llama-3-8B-Instruct": _L3_8B + ("default", 1.0, False, False, False, None),
    "Llama-3.1-8B": _L3_8B + ("llama3", 8.0, False, False, False, None),
    "Llama-3.1-8B-Instruct": _L3_8B + ("llama3", 8.0, False, False, False, None),
    "Llama-3.2-1B": _L32_1B + ("llama3", 32.0, True, False, False, None),
    "Llama-3.2-1B-Instruct": _L32_1B + ("llama3", 32.0, True, False, False, None),
    "Mistral-7B-Instruct-v0.2/_edited_copy_not_upstream":
        (4096, 32, 32, 8, 128, 14336, 32000, 1e6, "default", 1.0, False, False, False, None),
    "Qwen2.5-7B-Instruct": (3584, 28, 28, 4, 128, 18944, 152064, 1e6, "default", 1.0, False, True, False, None),
    "Qwen3-0.6B": (1024, 28, 16, 8, 128, 3072, 151936, 1e6, "default", 1.0, True, False, True, None),
    "Qwen3-1.7B": (2048, 28, 16, 8, 128, 6144, 151936, 1e6, "default", 1.0, True, False, True, None),
    "Qwen3-4B": (2560, 36, 32, 8, 128, 9728, 151936, 1e6, "default", 1.0, True, False, True, None),
    "Qwen3-8B": (4096, 36, 32, 8, 128, 12288, 151936, 1e6, "default", 1.0, False, False, True, None),
}


def read_config(name):
    return json.loads((CONFIGS / name / "config.json").read_text())


def test_every_real_config_is_covered():
    assert sorted(EXPECTED_ARGS) == REAL_CONFIGS


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_real_config_parses(name):
    a = model.args_from_config(read_config(name))
    got = (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_dim, a.vocab_size, a.rope_theta,
           a.rope_type, a.rope_factor, a.tie_embeddings, a.qkv_bias, a.qk_norm, a.sliding_window)
    assert got == EXPECTED_ARGS[name]
    assert not a.o_bias and not a.mlp_bias
    if a.rope_type == "llama3":  # Meta's published scaling constants
        assert (a.rope_low_freq_factor, a.rope_high_freq_factor, a.rope_original_max_pos) == (1.0, 4.0, 8192)


def test_qwen2_sliding_window_is_read_only_when_used():
    cfg = read_config("Qwen2.5-7B-Instruct")
    assert cfg["sliding_window"] == 131072 and cfg["use_sliding_window"] is False
    assert model.args_from_config(cfg).sliding_window is None
    assert model.args_from_config(dict(cfg, use_sliding_window=True)).sliding_window == 131072


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_shrunk_real_config_matches_transformers(transformers, tmp_path, name):
    small = ref.shrink_config(read_config(name))
    path = ref.save_random_checkpoint(tmp_path, small)
    assert json.loads((path / "config.json").read_text()) == small  # as published: v4 style
    errors = ref.parity_errors(path)
    assert max(errors.values()) <= PARITY_TOL, errors


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_v5_config_gives_same_args(transformers, tmp_path, name):
    """transformers v5 rewrites rope_theta/rope_scaling into rope_parameters on save."""
    cfg = read_config(name)
    (tmp_path / "v4").mkdir()
    (tmp_path / "v4" / "config.json").write_text(json.dumps(cfg))
    transformers.AutoConfig.from_pretrained(tmp_path / "v4").save_pretrained(tmp_path / "v5")
    v5 = json.loads((tmp_path / "v5" / "config.json").read_text())
    assert "rope_parameters" in v5 and "rope_theta" not in v5 and "rope_scaling" not in v5
    assert model.args_from_config(v5) == model.args_from_config(cfg)


SENTENCES = ["Hello world", "The café costs €5, a naïve façade!", "Once upon a time, there was a little girl.",
             "日本語のテキスト", "Line one\nline two\ttab", "x", ""]
# Where transformers v5's LlamaTokenizer (rebuilt with a Metaspace pre-tokenizer) and the published
# tokenizer.json (a Prepend normalizer, sentencepiece's behaviour) disagree: leading spaces and the
# space after a special token written in the text. Only the tokenizer.json reference is used here.
TOKENIZER_JSON_ONLY = ["  Leading spaces and trailing  ", " x", "<s> literal special </s>"]


def test_mistral_tokenizer_matches_transformers(transformers, tmp_path):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(CONFIGS / "Mistral-7B-Instruct-v0.2" / f, tmp_path / f)
    tok = tokenizer.Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    from_file = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    ours = tok.encode(SENTENCES + TOKENIZER_JSON_ONLY)
    for text, ids in zip(SENTENCES + TOKENIZER_JSON_ONLY, ours):
        assert ids[0] == 1 and ids.count(1) == 1  # BOS once, at the start: "<s>" in a text is text
        assert ids == from_file(text, split_special_tokens=True)["input_ids"], text
        if text in SENTENCES:
            assert ids == auto(text)["input_ids"], text
    assert ours[SENTENCES.index("Hello world")] == [1, 22557, 1526]  # <s> ▁Hello ▁world
    assert tok.encode(["Hello world"], add_special_tokens=False)[0] == [22557, 1526]


def test_qwen_tokenizer_matches_transformers(transformers, tmp_path):
    """tokenizer.json built by transformers from the real vocab.json + merges.txt."""
    src = tmp_path / "src"
    src.mkdir()
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(CONFIGS / "Qwen2.5-7B-Instruct" / f, src / f)
    hf = transformers.AutoTokenizer.from_pretrained(src)
    hf.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    tok = tokenizer.Tokenizer.from_dir(tmp_path / "out")
    assert tok.bos_id is None and tok.eos_id == 151645 and tok.pad_id == 151643  # <|im_end|>, <|endoftext|>
    for text, ids in zip(SENTENCES + TOKENIZER_JSON_ONLY, tok.encode(SENTENCES + TOKENIZER_JSON_ONLY)):
        assert ids == hf(text)["input_ids"], text
        assert ids == tok.encode([text], add_special_tokens=False)[0]  # nothing added: no BOS, no EOS
    assert tok.encode(["Hello world"])[0] == [9707, 1879]
    assert tok.encode([""])[0] == []


def test_real_sharded_index(tmp_path):
    """Qwen3-4B's published index: its shards are named and must exist."""
    shutil.copy(CONFIGS / "Qwen3-4B" / "model.safetensors.index.json", tmp_path)
    assert_error(lambda: checkpoints.weight_files(tmp_path), "model.safetensors.index.json",
                 "model-00001-of-00003.safetensors")
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for n in names:
        (tmp_path / n).touch()
    assert checkpoints.weight_files(tmp_path) == [tmp_path / n for n in names]


def test_weight_files_of_a_sharded_save(transformers, tmp_path):
    path = ref.make_tiny_checkpoint(tmp_path / "ckpt", "qwen2", max_shard_size="40KB")
    index = path / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    assert len(shards) > 1
    assert checkpoints.weight_files(path) == [path / s for s in shards]
    assert checkpoints.weight_files(path) == sorted(path.glob("*.safetensors"))


# -----------------------------------------------------------------------------
# The bundled real model


def test_stories260K_reproduces_published_sample():
    m, tok = load_stories()
    assert tok.bos_id == 1
    ids = [tok.bos_id]
    n = len(tok.encode([PUBLISHED_SAMPLE])[0]) - 1  # the sample's own length in tokens (61)
    assert n >= 40
    with torch.no_grad():
        for _ in range(n):  # greedy, full forward each step, no cache
            h = m(torch.tensor([ids]), causal=True)  # [1, T, D]
            ids.append(int(m.token_logits(h[:, -1]).argmax(-1)))
    text = tok.decode(ids[1:])
    assert text[: len(PUBLISHED_SAMPLE)] == PUBLISHED_SAMPLE


def test_stories260K_matches_transformers(transformers):
    errors = ref.parity_errors(STORIES, lengths=(40, 25, 7, 1))
    assert max(errors.values()) <= PARITY_TOL, errors


# -----------------------------------------------------------------------------
# Embedder: invariance, attention kind, prompts

def varied_texts(n=40, seed=0):
    """Texts from 1 to ~80 words, in a shuffled order."""
    words = PUBLISHED_SAMPLE.replace(",", "").replace(".", "").split()
    rng = random.Random(seed)
    lengths = [1, 2, 80, 3, 60] + [rng.randint(1, 50) for _ in range(n - 5)]
    return [" ".join(rng.choice(words) for _ in range(k)).capitalize() + "." for k in lengths]


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_embedding_independent_of_batch(pooling, causal):
    m, tok = load_stories()
    emb = model.Embedder(m, tok, pooling, causal=causal)
    texts = varied_texts()
    lengths = [len(x) for x, _ in tok.encode_with_prompt(texts, emb.prompt)]
    assert max(lengths) > 5 * min(lengths)  # very different lengths, so heavy padding
    batched = emb.encode(texts, batch_size=32)  # two batches
    single = emb.encode(texts, batch_size=1)
    alone = np.stack([emb.encode([t])[0] for t in texts[:6]])
    assert batched.shape == (len(texts), m.args.dim) and batched.dtype == np.float32
    assert scaled_error(batched, single) <= INVARIANCE_TOL
    assert scaled_error(batched[:6], alone) <= INVARIANCE_TOL
    assert np.abs(batched - batched[0]).max() > 1e-2  # different texts, different embeddings


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_padding_does_not_leak(causal):
    """Real positions are unchanged by right padding (padding holds arbitrary ids)."""
    m, tok = load_stories()
    ids = torch.tensor([tok.encode(["Lily saw a big red ball."])[0]])  # [1, T]
    T = ids.shape[1]
    padded = torch.cat([ids, torch.randint(3, 512, (1, 9), generator=torch.Generator().manual_seed(0))], 1)
    mask = torch.arange(T + 9)[None] < T
    with torch.no_grad():
        h = m(ids, causal=causal)
        hp = m(padded, mask, causal=causal)[:, :T]
    assert scaled_error(hp, h) <= INVARIANCE_TOL


def test_attention_kinds():
    """Bidirectional: position 0 sees the last token. Causal: nothing before it changes."""
    m, tok = load_stories()
    ids = torch.tensor([tok.encode(["Once upon a time there was a cat"])[0]])
    other = ids.clone()
    other[0, -1] = 300 if ids[0, -1] != 300 else 301
    with torch.no_grad():
        for causal in (True, False):
            h, h2 = m(ids, causal=causal), m(other, causal=causal)
            assert (h[0, -1] - h2[0, -1]).abs().max() > 1e-2
            before = (h[0, :-1] - h2[0, :-1]).abs().max()
            assert before == 0 if causal else (h[0, 0] - h2[0, 0]).abs().max() > 1e-3


def prompt_pieces(tok, prompt, text):
    """Reference, from the tokenizers library's offsets: the ids of prompt+text, and which of them
    come before the text, from the text, and after it."""
    start = prompt.index("{text}")
    end = start + len(text)
    enc = tok.tok.encode(prompt.replace("{text}", text))
    head = [i for i, (s, e) in zip(enc.ids, enc.offsets) if e <= start]
    tail = [i for i, (s, e) in zip(enc.ids, enc.offsets) if s >= end]
    text_pos = [k for k, (s, e) in enumerate(enc.offsets) if s < end and e > start]
    return enc.ids, head, text_pos, tail


def test_last_pooling_uses_prompteol_and_keeps_it_whole():
    m, tok = load_stories()
    emb = model.Embedder(m, tok, "last")
    assert emb.prompt == PROMPT_EOL
    short = "Lily saw a big red ball in the park"
    ids, head, _, tail = prompt_pieces(tok, PROMPT_EOL, short)
    assert head[0] == 1 and len(tail) >= 5
    # untruncated: the last token of the prompt is pooled
    with torch.no_grad():
        h = m(torch.tensor([ids]), causal=False)[0, -1]
    assert scaled_error(emb.encode([short])[0], h) <= INVARIANCE_TOL
    # truncated: the text is cut, the prompt is kept whole
    long = " ".join([short] * 20)
    for max_length in (len(head) + len(tail) + 1, 40, 64):
        got, att, _ = emb.tokenize([long], max_length=max_length)
        got = got[0].tolist()
        assert max_length - 2 <= len(got) <= max_length
        assert got[: len(head)] == head and got[-len(tail):] == tail, max_length
    assert_error(lambda: emb.tokenize([long], max_length=len(head) + len(tail) - 1), "max_length")


def test_mean_pooling_with_prompt_averages_only_the_text():
    m, tok = load_stories()
    prompt = "Story: {text} The end."
    text = "Lily saw a big red ball in the park"
    emb = model.Embedder(m, tok, "mean", causal=False, prompt=prompt)
    ids, head, text_pos, tail = prompt_pieces(tok, prompt, text)
    assert len(text_pos) >= 5 and len(head) >= 2 and len(tail) >= 2
    with torch.no_grad():
        h = m(torch.tensor([ids]), causal=False)[0]  # [T, D]
    expected = h[text_pos].mean(0).numpy()
    got = emb.encode([text])[0]
    assert scaled_error(got, expected) <= INVARIANCE_TOL
    assert np.abs(got - h.mean(0).numpy()).max() > 1e-3  # averaging the prompt too would differ


# -----------------------------------------------------------------------------
# LoRA

def lora_outputs(m, ids, mask):
    with torch.no_grad():
        return m(ids, mask, causal=False)


def randomize_lora_b(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def stories_batch(tok):
    return tok.batch(["Once upon a time there was a cat.", "Lily saw a big red ball in the park."])


def test_lora_fresh_off_merged(tmp_path):
    m, tok = load_stories()
    ids, mask = stories_batch(tok)
    base = lora_outputs(m, ids, mask)
    trainable = model.add_lora(m, r=4, alpha=8, dropout=0.0)
    assert torch.equal(lora_outputs(m, ids, mask), base)  # B = 0 at the start
    randomize_lora_b(m)
    tuned = lora_outputs(m, ids, mask)
    assert (tuned - base).abs().max() > 1e-2
    with model.lora_enabled(m, False):
        assert torch.equal(lora_outputs(m, ids, mask), base)
    assert torch.equal(lora_outputs(m, ids, mask), tuned)  # switched back on
    # only the adapters train: A and B of 7 projections in every layer
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert len(names) == len(trainable) == 2 * 7 * m.args.n_layers
    assert all("lora_A" in n or "lora_B" in n for n in names)
    # save, load into a fresh model
    model.save_lora(m, tmp_path / "adapter.safetensors")
    fresh, _ = load_stories()
    model.add_lora(fresh, r=4, alpha=8, dropout=0.0)
    model.load_lora(fresh, tmp_path / "adapter.safetensors")
    assert torch.equal(lora_outputs(fresh, ids, mask), tuned)
    # merged into the base weights: plain Linear layers, same outputs
    model.merge_lora(m)
    assert not any(isinstance(x, model.LoRALinear) for x in m.modules())
    # merging changes only the fp32 rounding: (W + s B A) x against W x + s B (A x)
    assert scaled_error(lora_outputs(m, ids, mask)[mask], tuned[mask]) <= INVARIANCE_TOL


def test_lora_merge_with_biases(transformers, tmp_path):
    """Qwen2's q/k/v biases survive wrapping and merging."""
    path = ref.make_tiny_checkpoint(tmp_path, "qwen2")
    m, _ = model.load(path)
    ids, mask = ref.random_batch([12, 5])
    model.add_lora(m, r=4, alpha=8, dropout=0.0)
    randomize_lora_b(m)
    tuned = lora_outputs(m, ids, mask)
    model.merge_lora(m)
    assert m.layers[0].self_attn.q_proj.bias is not None
    assert scaled_error(lora_outputs(m, ids, mask)[mask.bool()], tuned[mask.bool()]) <= INVARIANCE_TOL


def test_lora_mismatched_adapter(tmp_path):
    m, _ = load_stories()
    model.add_lora(m, r=4, alpha=8)
    file = tmp_path / "adapter.safetensors"
    model.save_lora(m, file)
    other_rank, _ = load_stories()
    model.add_lora(other_rank, r=8, alpha=16)
    assert_error(lambda: model.load_lora(other_rank, file), str(file), "layers.0.mlp.down_proj.lora_A",
                 "(4, 172)", "(8, 172)")
    fewer_targets, _ = load_stories()
    model.add_lora(fewer_targets, r=4, alpha=8, targets=("q_proj", "v_proj"))
    assert_error(lambda: model.load_lora(fewer_targets, file), str(file), "unexpected",
                 "layers.0.mlp.down_proj.lora_A")
    assert_error(lambda: model.load_lora(fewer_targets, tmp_path / "none.safetensors"), "none.safetensors")
    assert_error(lambda: model.add_lora(load_stories()[0], targets=("qkv",)), "qkv")


def test_gradient_checkpointing_same_gradients():
    m, tok = load_stories()
    ids, mask = stories_batch(tok)
    model.add_lora(m, r=4, alpha=8, dropout=0.05)  # dropout on: the recompute must replay its RNG
    randomize_lora_b(m)
    m.train()
    calls = []  # a pre-hook: the recompute stops as soon as it has what backward needs, before any post-hook
    m.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))

    def grads(checkpointing):
        m.grad_checkpointing = checkpointing
        m.zero_grad(set_to_none=True)
        calls.clear()
        torch.manual_seed(0)
        h = m(ids, mask, causal=False)
        model.mean_pool(h, mask).pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}, len(calls)

    plain, plain_calls = grads(False)
    ckpt, ckpt_calls = grads(True)
    assert (plain_calls, ckpt_calls) == (1, 2)  # the checkpointed layer really ran again in backward
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for n in plain:
        assert (plain[n] - ckpt[n]).abs().max() <= GRAD_TOL, n
    assert max(g.abs().max() for g in plain.values()) > 1e-3


# -----------------------------------------------------------------------------
# Loading dtypes

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_dtype(dtype):
    m, tok = model.load(STORIES, dtype=dtype)
    assert {p.dtype for p in m.parameters()} == {dtype}
    assert {p.device.type for p in m.parameters()} == {"cpu"}
    assert m.lm_head.weight is m.embed_tokens.weight
    ids, mask = stories_batch(tok)
    m32, _ = load_stories()
    with torch.no_grad():
        h, h32 = m(ids, mask).float(), m32(ids, mask)
    cos = torch.nn.functional.cosine_similarity(h[mask], h32[mask], dim=-1)
    assert cos.min() > 0.99  # the same model, at lower precision


# -----------------------------------------------------------------------------
# Errors name the file and the key or tensor

@pytest.fixture
def stories_copy(tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(STORIES, path)
    return path


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_weights(path, drop=(), add=None):
    file = path / "model.safetensors"
    state = {k: v for k, v in load_file(str(file)).items() if k not in drop}
    save_file(dict(state, **(add or {})), str(file))


def test_error_unsupported_model_type(stories_copy):
    edit_config(stories_copy, model_type="gpt2")
    assert_error(lambda: model.load(stories_copy), "config.json", "model_type", "gpt2")


def test_error_unsupported_activation(stories_copy):
    edit_config(stories_copy, hidden_act="gelu")
    assert_error(lambda: model.load(stories_copy), "config.json", "hidden_act", "gelu")


def test_error_unsupported_rope(stories_copy):
    edit_config(stories_copy, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert_error(lambda: model.load(stories_copy), "config.json", "rope_scaling", "yarn")
    edit_config(stories_copy, rope_scaling=None, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                   "rope_theta": 10000.0})
    assert_error(lambda: model.load(stories_copy), "config.json", "rope_parameters", "dynamic")


def test_error_missing_config_key(stories_copy):
    cfg = json.loads((stories_copy / "config.json").read_text())
    del cfg["intermediate_size"]
    (stories_copy / "config.json").write_text(json.dumps(cfg))
    assert_error(lambda: model.load(stories_copy), "config.json", "intermediate_size")


def test_error_missing_tensor(stories_copy):
    edit_weights(stories_copy, drop=["model.layers.4.mlp.up_proj.weight"])
    assert_error(lambda: model.load(stories_copy), str(stories_copy), "model.layers.4.mlp.up_proj.weight")


def test_error_unexpected_tensor(stories_copy):
    edit_weights(stories_copy, add={"model.layers.5.mlp.up_proj.weight": torch.zeros(172, 64)})  # a 6th layer
    assert_error(lambda: model.load(stories_copy), "model.safetensors", "model.layers.5.mlp.up_proj.weight")


def test_error_wrong_shape(stories_copy):
    edit_weights(stories_copy, add={"model.norm.weight": torch.ones(65)})
    assert_error(lambda: model.load(stories_copy), "model.safetensors", "model.norm.weight", "(65,)", "(64,)")


def test_error_missing_files(stories_copy):
    (stories_copy / "tokenizer.json").unlink()
    assert_error(lambda: model.load(stories_copy), str(stories_copy / "tokenizer.json"))
    (stories_copy / "config.json").unlink()
    assert_error(lambda: model.load(stories_copy), str(stories_copy / "config.json"))
    (stories_copy / "model.safetensors").unlink()
    assert_error(lambda: checkpoints.weight_files(stories_copy), str(stories_copy), "model.safetensors")


def test_error_broken_index(transformers, tmp_path):
    path = ref.make_tiny_checkpoint(tmp_path / "ckpt", "llama", max_shard_size="40KB")
    index = path / "model.safetensors.index.json"
    good = index.read_text()
    index.write_text(good[:-20])  # truncated JSON
    assert_error(lambda: model.load(path), str(index), "invalid JSON")
    index.write_text(json.dumps({"metadata": {}}))
    assert_error(lambda: model.load(path), str(index), "weight_map")
    index.write_text(good)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert_error(lambda: model.load(path), str(index), shard.name)


def test_error_sequence_beyond_sliding_window(stories_copy):
    edit_config(stories_copy, model_type="mistral", sliding_window=8)
    m, tok = model.load(stories_copy)
    m(torch.ones(1, 8, dtype=torch.long))  # within the window: fine
    assert_error(lambda: m(torch.ones(1, 9, dtype=torch.long)), "sliding window", "9")
