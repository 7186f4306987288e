"""targets.py against hand-worked examples and direct formulas (README.md, "The method": stage 1, stage 2, loss).

Token ids of the bundled stories260K tokenizer (512-piece Llama SentencePiece-style BPE with byte
fallback) are looked up by piece name in the `tokenizers` library, never copied from our output.
"""

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, processors

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import model  # noqa: E402
import targets  # noqa: E402
import tokenizer  # noqa: E402
from targets import (  # noqa: E402
    TargetsError, content_words, data_driven_target, entropy, idf_weights, kl_loss, load_targets,
    model_derived_target, precompute_data_driven, precompute_model_derived, save_targets, topk_sparse)

STORIES = ROOT / "data" / "models" / "stories260K"


@pytest.fixture(scope="module")
def tok():
    return tokenizer.Tokenizer.from_dir(STORIES)


@pytest.fixture(scope="module")
def piece():
    """piece name -> id, straight from tokenizer.json (the reference)."""
    raw = HFTokenizer.from_file(str(STORIES / "tokenizer.json"))
    return raw.token_to_id


def ids_of(piece, names):
    ids = {n: piece(n) for n in names}
    assert None not in ids.values(), f"piece missing from the vocabulary: {ids}"
    return sorted(set(ids.values()))


# -----------------------------------------------------------------------------
# Stage 1: data-driven targets


def test_stopword_list_is_nltk_english():
    words = targets.stopwords()
    assert len(words) == 179 + 4  # NLTK 3.8 `english` + the authors' ! , . ?
    assert {"the", "and", "wouldn't", "ourselves", "ma", "!", ","} <= words
    assert "cat" not in words


def test_hand_worked_example(tok, piece):
    text = "The cat, the dog_and-the BIRD!!"
    # step 1: "The cat the dog and the BIRD "; step 2 drops The/the/and (compared lower case)
    assert content_words(text) == "cat dog BIRD"
    # BPE by hand from tokenizer.json's merges: "▁cat": merge "▁ c" (rank 22) then "a t" (37), no
    # "▁c at" merge -> ▁c at; "▁dog": "▁ d" (21), "▁d o" (154) -> ▁do g; "▁BIRD": "▁ B" (118),
    # no merge among I R D -> ▁B I R D. Eight distinct pieces.
    ids, w = data_driven_target(text, tok)
    assert ids.tolist() == ids_of(piece, ["▁c", "at", "▁do", "g", "▁B", "I", "R", "D"])
    assert ids.dtype == torch.long and w.dtype == torch.float32
    assert torch.allclose(w, torch.full((8,), 1 / 8)) and abs(w.sum().item() - 1) < 1e-6


def test_case_kept_and_repeats_counted_once(tok, piece):
    assert content_words("THE Cat sat ON the mat") == "Cat sat mat"
    ids, w = data_driven_target("cat cat cat, CAT", tok)
    # cat -> ▁c at (three times, counted once); CAT -> ▁ C A T (the merges have "▁ T" but no
    # "▁ C" and none among capitals), and the lone "▁" decodes to "": dropped
    assert ids.tolist() == ids_of(piece, ["▁c", "at", "C", "A", "T"])
    assert torch.allclose(w, torch.full((5,), 1 / 5))


@pytest.mark.parametrize("text", ["", "   ", "The and of it, was THEY", "!!! ... ,,, ___ -- ?!", "\n\t"])
def test_no_target(tok, text):
    ids, w = data_driven_target(text, tok)
    assert ids.shape == (0,) and w.shape == (0,)


def test_non_latin_byte_fallback_pieces_kept(tok, piece):
    # Greek and Chinese letters are \w, so step 1 keeps them; this vocabulary has no piece for them,
    # so they become UTF-8 byte pieces <0xCE> ... Each decodes alone to U+FFFD (a partial UTF-8
    # sequence), which is not whitespace: kept. The leading "▁" piece decodes to "" : dropped.
    for text in ["καλημέρα", "你好"]:
        ids, w = data_driven_target(text, tok)
        expected = ids_of(piece, [f"<0x{b:02X}>" for b in text.encode("utf-8")])
        assert ids.tolist() == expected
        assert piece("▁") not in ids.tolist()
        assert torch.allclose(w.sum(), torch.tensor(1.0))
    assert content_words("東京_タワー naïve") == "東京 タワー naïve"


def test_truncated_to_max_length_tokens(tok, piece):
    text = "cat cat cat cat cat dog"  # 5 x (▁c at) = 10 tokens, then ▁do g
    assert data_driven_target(text, tok, max_length=10)[0].tolist() == ids_of(piece, ["▁c", "at"])
    assert data_driven_target(text, tok, max_length=11)[0].tolist() == ids_of(piece, ["▁c", "at", "▁do"])
    assert data_driven_target(text, tok, max_length=12)[0].tolist() == ids_of(piece, ["▁c", "at", "▁do", "g"])
    long_text = "cat " * 5000 + "dog"
    assert data_driven_target(long_text, tok, max_length=128)[0].tolist() == ids_of(piece, ["▁c", "at"])


def word_level_tokenizer(bos=False):
    """A tiny tokenizer whose vocabulary has a special token (ENDTOKEN, matched in raw text even
    without special tokens), a whitespace-only piece (" ", split off as its own piece), an empty
    piece, and optionally a Llama-3-like BOS with a large id that the post-processor prepends."""
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, " ": 3, "": 4, "ENDTOKEN": 5, "<|begin_of_text|>": 9}
    raw = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")
    raw.add_special_tokens(["ENDTOKEN", "<|begin_of_text|>"])
    config = {}
    if bos:
        raw.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 9)])
        config = {"bos_token": "<|begin_of_text|>"}
    return tokenizer.Tokenizer(raw, config, where="test")


def test_special_and_whitespace_pieces_dropped():
    tok = word_level_tokenizer()
    raw_ids = tok.encode(["hello ENDTOKEN world"], add_special_tokens=False)[0]
    assert raw_ids == [1, 3, 5, 3, 2]  # hello, " ", ENDTOKEN, " ", world: both bad kinds present
    assert tok.decode([4]).strip() == "" and 5 in tok.special_ids
    ids, w = data_driven_target("hello ENDTOKEN world", tok)
    assert ids.tolist() == [1, 2] and w.tolist() == [0.5, 0.5]
    assert targets.is_bad_id(tok, 4)  # the empty piece too


class AlwaysSpecial(tokenizer.Tokenizer):
    """A wrapper that adds special tokens whatever it is asked (a careless Llama-3 wrapper)."""

    def encode(self, texts, add_special_tokens=True, max_length=None):
        return super().encode(texts, True, max_length)


def test_llama3_like_bos_never_in_target():
    tok = word_level_tokenizer(bos=True)
    assert tok.encode(["hello"], add_special_tokens=True)[0] == [9, 1]
    assert data_driven_target("hello world", tok)[0].tolist() == [1, 2]
    careless = AlwaysSpecial(tok.tok, {"bos_token": "<|begin_of_text|>"}, where="test")
    assert careless.encode(["hello"], add_special_tokens=False)[0] == [9, 1]
    assert data_driven_target("hello world", careless)[0].tolist() == [1, 2]  # BOS id 9 filtered


def test_idf_weights_hand_worked(tok, piece):
    texts = ["cat dog", "cat", "BIRD", "the"]  # N = 4; the last has no target but counts as a text
    idf = idf_weights(texts, tok, max_length=128)
    assert idf.shape == (512,)
    c, do, b = piece("▁c"), piece("▁do"), piece("▁B")
    # smooth idf: log((1 + N) / (1 + df)) + 1
    assert idf[c].item() == pytest.approx(math.log(5 / 3) + 1, rel=1e-6)  # df 2
    assert idf[do].item() == pytest.approx(math.log(5 / 2) + 1, rel=1e-6)  # df 1
    assert idf[piece("ing")].item() == pytest.approx(math.log(5) + 1, rel=1e-6)  # df 0
    ids, w = data_driven_target("cat dog", tok, weights=idf)
    expected = idf[ids] / idf[ids].sum()  # ▁c, at have df 2; ▁do, g have df 1
    assert torch.allclose(w, expected) and w[ids.tolist().index(do)] > w[ids.tolist().index(c)]
    assert b not in ids.tolist()


def test_precompute_data_driven_rows(tok, piece):
    texts = ["cat dog", "the of", "BIRD"]
    calls = []
    ids, w, n_empty = precompute_data_driven(texts, tok, 128, k=4, progress=lambda d, t: calls.append((d, t)))
    assert n_empty == 1 and calls[-1] == (3, 3)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids.shape == (3, 4)  # k = 4 covers the longest target (▁c at ▁do g)
    assert ids[0].tolist() == ids_of(piece, ["▁c", "at", "▁do", "g"])
    assert ids[1].tolist() == [-1] * 4 and w[1].tolist() == [0.0] * 4
    assert ids[2].tolist() == ids_of(piece, ["▁B", "I", "R", "D"])
    wide, _, _ = precompute_data_driven(["cat dog BIRD"], tok, 128, k=4)
    assert wide.shape == (1, 8)  # widened, not truncated: 8 distinct ids > k
    targets.check_targets(ids, w, "test")


# -----------------------------------------------------------------------------
# Stage 2: model-derived targets


def test_model_derived_hand_worked():
    p, b = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.8, 0.1, 0.1])
    # r = p / (p + b) = 0.6/1.4 = 0.428571, 0.3/0.4 = 0.75, 0.1/0.2 = 0.5
    # tau = 0.5: r / tau = 0.857143, 1.5, 1.0; exp = 2.356418, 4.481689, 2.718282, sum 9.556389
    # q = 0.246580, 0.468973, 0.284447
    q = model_derived_target(p.log()[None] + 3.0, b.log(), tau=0.5)  # logits shift-invariant
    assert q.shape == (1, 3) and q.dtype == torch.float32
    assert torch.allclose(q[0], torch.tensor([0.246580, 0.468973, 0.284447]), atol=1e-5)
    # tiny tau: near one-hot on token 1, the most likely *relative to the background*, not token 0
    sharp = model_derived_target(p.log()[None], b.log(), tau=1e-4)
    assert sharp[0, 1] > 1 - 1e-6 and sharp[0, 0] < 1e-6
    assert entropy(sharp).item() < 1e-4
    with pytest.raises(TargetsError, match="tau"):
        model_derived_target(p.log()[None], b.log(), tau=0.0)


def test_model_derived_rows_sum_to_one_and_entropy():
    logits, bg = torch.randn(5, 50, dtype=torch.float64), torch.randn(50)
    q = model_derived_target(logits, bg, tau=0.1)
    assert q.dtype == torch.float32 and torch.allclose(q.sum(-1), torch.ones(5))
    assert torch.allclose(entropy(torch.full((2, 8), 1 / 8)), torch.full((2,), math.log(8)))
    one_hot = torch.tensor([[0.0, 1.0, 0.0]])
    assert entropy(one_hot).item() == 0.0  # 0 log 0 = 0, not nan
    assert entropy(model_derived_target(logits, bg, 1e-4)).mean() < entropy(q).mean()


def test_topk_sparse():
    q = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.1, 0.2, 0.3, 0.25, 0.15]])
    ids, w = topk_sparse(q, k=4)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids[0].tolist() == [0, 2, 3, -1] and torch.allclose(w[0], torch.tensor([0.5, 0.3, 0.2, 0.0]))
    assert ids[1].tolist() == [2, 3, 1, 4] and torch.allclose(w[1], torch.tensor([0.3, 0.25, 0.2, 0.15]) / 0.9)
    ids, w = topk_sparse(q, k=7)  # k > V: padded
    assert ids.shape == (2, 7) and ids[1, 5:].tolist() == [-1, -1] and w[1].sum().item() == pytest.approx(1)


# -----------------------------------------------------------------------------
# Loss


def test_kl_loss_direct_formula():
    torch.manual_seed(0)
    logits, q = torch.randn(4, 10), torch.softmax(torch.randn(4, 10), -1)
    p = np.exp(logits.double().numpy())
    p /= p.sum(-1, keepdims=True)
    qn = q.double().numpy()
    direct = (qn * np.log(qn / p)).sum(-1).mean()
    assert kl_loss(logits, q).item() == pytest.approx(direct, abs=1e-6)
    cross_entropy = -(qn * np.log(p)).sum(-1).mean()
    target_entropy = -(qn * np.log(qn)).sum(-1).mean()
    assert kl_loss(logits, q).item() == pytest.approx(cross_entropy - target_entropy, abs=1e-6)
    assert abs(kl_loss(q.log(), q).item()) < 1e-6
    assert kl_loss(logits.bfloat16(), q).dtype == torch.float32


def test_kl_loss_dense_equals_sparse():
    torch.manual_seed(1)
    B, V, k = 3, 20, 6
    logits = torch.randn(B, V, requires_grad=True)
    ids = torch.full((B, k), -1, dtype=torch.int32)
    w = torch.zeros(B, k)
    support = [[3, 7, 11], [0, 19], [1, 2, 4, 5, 6, 8]]  # rows with 3, 2 and k ids
    for r, s in enumerate(support):
        ids[r, :len(s)] = torch.tensor(s, dtype=torch.int32)
        w[r, :len(s)] = torch.softmax(torch.randn(len(s)), -1)
    dense = torch.zeros(B, V).scatter_add_(1, ids.long().clamp(min=0), w)  # empty slots add 0 to id 0
    loss_d = kl_loss(logits, dense)
    (grad_d,) = torch.autograd.grad(loss_d, logits)
    loss_s = kl_loss(logits, (ids, w))
    (grad_s,) = torch.autograd.grad(loss_s, logits)
    assert abs(loss_d.item() - loss_s.item()) < 1e-6
    assert torch.allclose(grad_d, grad_s, atol=1e-6)
    q = torch.softmax(torch.randn(B, V), -1)  # full support, stored with k = V
    assert abs(kl_loss(logits, q).item() - kl_loss(logits, topk_sparse(q, V)).item()) < 1e-6
    with pytest.raises(TargetsError, match="empty"):
        kl_loss(logits, (torch.full((B, k), -1), torch.zeros(B, k)))


# -----------------------------------------------------------------------------
# Corpus drivers


class FakeEmbedder:
    """embed: a fixed feature vector per text; token_logits: a fixed linear map (a reference
    we can compute directly)."""

    def __init__(self, D=6, V=30):
        g = torch.Generator().manual_seed(0)
        self.head = torch.randn(V, D, generator=g, dtype=torch.float64)
        self.model = self
        self.training = True
        self.tokenizer = None
        self.modes_seen = set()

    def embed(self, texts):
        self.modes_seen.add(self.training)
        return torch.stack([torch.sin(torch.arange(6.0) * (len(t) + 1)) for t in texts])

    def token_logits(self, h):
        return (h.double() @ self.head.T).float()

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode


def test_background_and_precompute_drivers():
    emb = FakeEmbedder()
    texts = ["a", "bb", "ccc dd", "e", "ffffffff", "gg g"]
    z = emb.token_logits(emb.embed(texts))  # [6, V], the reference
    emb.modes_seen.clear()
    bg = targets.background_logits(emb, texts, batch_size=4)
    assert bg.dtype == torch.float32 and torch.allclose(bg, z.double().mean(0).float(), atol=1e-6)
    total, count = targets.background_sum(emb, texts[:4], batch_size=3)
    total2, count2 = targets.background_sum(emb, texts[4:], batch_size=3)  # two "ranks"
    assert total.dtype == torch.float64 and count + count2 == 6
    assert torch.allclose(((total + total2) / 6).float(), bg, atol=1e-6)
    assert emb.modes_seen == {False} and emb.training  # eval during the pass, train mode restored
    with pytest.raises(TargetsError, match="no texts"):
        targets.background_sum(emb, [])
    calls = []
    ids, w = precompute_model_derived(emb, texts, bg, tau=0.05, k=5, batch_size=4,
                                      progress=lambda d, t: calls.append((d, t)))
    ref_ids, ref_w = topk_sparse(model_derived_target(z, bg, 0.05), 5)
    assert torch.equal(ids, ref_ids) and torch.allclose(w, ref_w)  # back in text order
    assert calls[-1] == (6, 6)


def test_precomputed_agrees_with_on_the_fly_on_bundled_model():
    net, tok = model.load(STORIES)
    emb = model.Embedder(net, tok, max_length=64)
    texts = ["Once upon a time there was a cat.", "The dog ran to the park!", "Lily liked red apples."]
    bg = targets.background_logits(emb, texts, batch_size=2)
    ids, w = precompute_model_derived(emb, texts, bg, tau=0.05, k=512, batch_size=2)
    with torch.no_grad():
        logits = net.token_logits(emb.embed(texts))
        q = model_derived_target(logits, bg, 0.05)  # on the fly, dense
        assert abs(kl_loss(logits + 1.0, q).item() - kl_loss(logits + 1.0, (ids, w)).item()) < 1e-5


# -----------------------------------------------------------------------------
# Storage


def sample_targets():
    ids = torch.tensor([[5, 2, -1], [-1, -1, -1], [0, 1, 2]], dtype=torch.int32)
    w = torch.tensor([[0.75, 0.25, 0.0], [0.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    return ids, w


def test_save_load_round_trip(tmp_path):
    ids, w = sample_targets()
    header = {"kind": "data-driven", "max_length": 128, "n_empty": 1, "model": "stories260K"}
    path = tmp_path / "targets.safetensors"
    save_targets(path, ids, w, header)
    assert os.listdir(tmp_path) == ["targets.safetensors"]  # no temporary file left
    ids2, w2, header2 = load_targets(path)
    assert torch.equal(ids2, ids) and torch.equal(w2, w) and header2 == header


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    ids, w = sample_targets()
    path = tmp_path / "targets.safetensors"
    save_targets(path, ids, w, {"v": 1})

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(targets, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_targets(path, ids, w, {"v": 2})
    assert os.listdir(tmp_path) == ["targets.safetensors"]
    assert load_targets(path)[2] == {"v": 1}


def write_raw(path, tensors, metadata={"text2token": "{}"}):
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("case, match", [
    ("garbage", "not a readable safetensors"),
    ("missing_key", "'weights' missing"),
    ("wrong_dtype", "int32"),
    ("shape", "same"),
    ("row_sum", "row 0 of weights sums to 0.900000"),
    ("weight_in_empty_slot", "empty"),
    ("no_header", "metadata key 'text2token' missing"),
])
def test_corrupted_files_name_the_file(tmp_path, case, match):
    ids, w = sample_targets()
    path = tmp_path / f"{case}.safetensors"
    if case == "garbage":
        path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    elif case == "missing_key":
        write_raw(path, {"ids": ids})
    elif case == "wrong_dtype":
        write_raw(path, {"ids": ids.long(), "weights": w})
    elif case == "shape":
        write_raw(path, {"ids": ids, "weights": w[:2]})
    elif case == "row_sum":
        write_raw(path, {"ids": ids, "weights": w * torch.tensor([[0.9], [1.0], [1.0]])})
    elif case == "weight_in_empty_slot":
        write_raw(path, {"ids": ids, "weights": w + torch.tensor([[0.0, 0.0, 0.1]])})
    elif case == "no_header":
        write_raw(path, {"ids": ids, "weights": w}, metadata={"other": "x"})
    with pytest.raises(TargetsError, match=match) as err:
        load_targets(path)
    assert str(path) in str(err.value)
    with pytest.raises(TargetsError, match="not found"):
        load_targets(tmp_path / "absent.safetensors")
