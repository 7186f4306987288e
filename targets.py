"""Target distributions q(x) over the vocabulary, the KL loss against them, and their storage.

Follows README.md, "The method": "Stage 1" (data-driven targets: the text's own key tokens), "Stage 2"
(model-derived targets: tokens likely for this text relative to the corpus average) and "Loss"
(KL(q || softmax(z)), batch mean, fp32), reconstructed from Text2Token (arXiv 2510.10224) and the
authors' research code. Pure functions of texts, token ids and logits, plus the drivers that run
an embedder over a corpus (background logits, precomputed stage-2 targets), and top_tokens: the
tokens lm_head(h(x)) does predict (`t2t.py inspect`).

Dimensions: N texts, B batch, V vocabulary, D hidden, k slots of a sparse target.
Sparse targets: ids [.., k] (-1 = empty slot) and weights [.., k] (0 in empty slots, rows sum to 1).

Not included: the training loop and the teacher's LoRA switching (t2t.py), distributed
all-reduce (the caller sums background_sum over ranks), TF weighting.
"""

import contextlib
import json
import re
import weakref
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from files import write_atomic  # the one atomic writer

STOPWORDS_FILE = Path(__file__).resolve().parent / "data" / "stopwords_en.txt"
EXTRA_STOPWORDS = ("!", ",", ".", "?")  # the authors add these to NLTK's list (step 1 removes them anyway)
NON_WORD = re.compile(r"[\W_]+", re.UNICODE)  # runs of non-alphanumerics and "_"; keeps any script's letters
ENCODE_CHUNK = 4096  # texts per tokenizer call: the Rust tokenizer encodes a batch in parallel
HEADER_KEY = "text2token"  # safetensors metadata key holding the JSON header
ROW_SUM_TOL = 1e-4  # a stored row of weights must sum to 1 within this


class TargetsError(ValueError):
    """Bad targets file or bad target input; the message names the file or the argument."""


# -----------------------------------------------------------------------------
# Stage 1: data-driven targets


@lru_cache(maxsize=None)
def stopwords() -> frozenset:
    """NLTK's English stopwords (bundled, see the file's header) plus the authors' `! , . ?`."""
    lines = STOPWORDS_FILE.read_text(encoding="utf-8").splitlines()
    words = {w.strip() for w in lines if w.strip() and not w.startswith("#")}
    return frozenset(words) | frozenset(EXTRA_STOPWORDS)


def content_words(text: str) -> str:
    """Steps 1-2: "The cat, the dog_and-the BIRD!!" -> "cat dog BIRD" (original case kept)."""
    stop = stopwords()
    return " ".join(w for w in NON_WORD.sub(" ", text).split() if w.lower() not in stop)


# tokenizer -> {id: True if the id is a special token or decodes to whitespace/nothing}.
# Filled lazily, so a corpus only decodes the ids it uses; weak keys free it with the tokenizer.
_BAD_IDS = weakref.WeakKeyDictionary()


def is_bad_id(tokenizer, i: int) -> bool:
    """Step 4, from the tokenizer itself (the authors hard-coded Mistral's ids, which leaves
    Llama-3's BOS in the target): special tokens, and pieces like "▁" or "\\xa0" whose decoded
    text is whitespace or empty. Byte-fallback pieces of a multi-byte character decode to
    U+FFFD on their own; they are not whitespace, so they are kept."""
    cache = _BAD_IDS.setdefault(tokenizer, {})
    if i not in cache:
        cache[i] = i in tokenizer.special_ids or tokenizer.decode([i]).strip() == ""
    return cache[i]


def target_ids(token_ids, tokenizer) -> list[int]:
    """Steps 4-5: the distinct kept ids of one tokenized text, ascending."""
    return sorted(i for i in set(token_ids) if not is_bad_id(tokenizer, i))


def id_weights(ids: list[int], weights=None) -> torch.Tensor:
    """Step 5: uniform 1/|U| over the distinct ids, or proportional to weights[id] (e.g. IDF)."""
    if weights is None:
        return torch.full((len(ids),), 1.0 / max(len(ids), 1))
    if ids and ids[-1] >= len(weights):
        raise TargetsError(f"weights has {len(weights)} entries, but token id {ids[-1]} needs more")
    w = weights[torch.tensor(ids, dtype=torch.long)].float()  # [k]
    if ids and not w.sum() > 0:
        raise TargetsError(f"weights are zero (or negative) on every token id of a text: {ids}")
    return w / w.sum() if ids else w


def encode_content(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    """Step 3: tokenize the content words without special tokens, truncated to max_length."""
    return tokenizer.encode([content_words(t) for t in texts], add_special_tokens=False, max_length=max_length)


def data_driven_target(text: str, tokenizer, max_length=128, weights=None):
    """-> ids LongTensor [k] (distinct, ascending), weights FloatTensor [k] summing to 1; k may be 0.
    `weights` is an optional per-token-id vector [V] (e.g. idf_weights); default: uniform."""
    ids = target_ids(encode_content([text], tokenizer, max_length)[0], tokenizer)
    return torch.tensor(ids, dtype=torch.long), id_weights(ids, weights)


def corpus_target_ids(texts, tokenizer, max_length, progress=None):
    """Yields target_ids of each text in order, tokenizing ENCODE_CHUNK texts per call."""
    texts = list(texts)
    for start in range(0, len(texts), ENCODE_CHUNK):
        for token_ids in encode_content(texts[start:start + ENCODE_CHUNK], tokenizer, max_length):
            yield target_ids(token_ids, tokenizer)
        if progress:
            progress(min(start + ENCODE_CHUNK, len(texts)), len(texts))


def idf_weights(texts, tokenizer, max_length=128) -> torch.Tensor:
    """Smoothed IDF over the corpus of filtered-token sets -> FloatTensor [V], V = tokenizer.vocab_size.
    idf = log((1 + N) / (1 + df)) + 1, as scikit-learn's TfidfVectorizer(smooth_idf=True): an
    unseen id gets the largest value, an id in every text gets 1."""
    df = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    n = 0
    for ids in corpus_target_ids(texts, tokenizer, max_length):
        df[ids] += 1  # ids are distinct within a text, so this counts documents
        n += 1
    return torch.from_numpy(np.log((1 + n) / (1 + df)) + 1).float()


def precompute_data_driven(texts, tokenizer, max_length=128, k=64, weights=None, progress=None):
    """Stage-1 targets of a corpus -> (ids int32 [N, K], weights float32 [N, K], n_empty).
    Row i is text i. A text with no kept token gets an empty row (all -1 / 0): the training loop
    skips it, and n_empty counts them. Nothing is truncated: K = max(k, longest target), since a
    data-driven target has at most max_length ids."""
    rows = [(ids, id_weights(ids, weights)) for ids in corpus_target_ids(texts, tokenizer, max_length, progress)]
    width = max([k] + [len(ids) for ids, _ in rows])
    out_ids = np.full((len(rows), width), -1, dtype=np.int32)
    out_w = np.zeros((len(rows), width), dtype=np.float32)
    for r, (ids, w) in enumerate(rows):
        out_ids[r, :len(ids)] = ids
        out_w[r, :len(ids)] = w.numpy()
    n_empty = sum(1 for ids, _ in rows if not ids)
    return torch.from_numpy(out_ids), torch.from_numpy(out_w), n_empty


# -----------------------------------------------------------------------------
# Stage 2: model-derived targets


def model_derived_target(logits, background_logits, tau: float) -> torch.Tensor:
    """logits [B, V], background_logits [V] -> q [B, V] fp32.
    r = p / (p + b + 1e-8) is a saturating likelihood ratio in [0, 1): near 1 for tokens much more
    likely for this text than for the corpus average b, whatever their absolute probability.
    A small tau (default 1e-4) makes softmax(r / tau) concentrate on the highest ratios."""
    if not tau > 0:
        raise TargetsError(f"tau must be > 0, got {tau}")
    p = torch.softmax(logits.float(), dim=-1)  # [B, V]
    b = torch.softmax(background_logits.float(), dim=-1)  # [V]
    r = p / (p + b + 1e-8)  # [B, V]
    return torch.softmax(r / tau, dim=-1)


def entropy(q) -> torch.Tensor:
    """q [B, V] -> entropy per row [B] in nats, with 0 log 0 = 0 (reported for a choice of tau)."""
    return -torch.special.xlogy(q.float(), q.float()).sum(-1)


@contextlib.contextmanager
def eval_mode(module):
    """The teacher runs without dropout; the module's train/eval mode is restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def check_logits(z, texts, start, what):
    """z [B, V] of texts[start:start + B]: refuse NaN or inf (an LM head that overflows would
    otherwise turn every target built from it into NaN), naming the first such text."""
    bad = ~torch.isfinite(z).all(-1)  # [B]
    if bad.any():
        i = start + int(bad.nonzero()[0])
        raise TargetsError(f"{what}: the model's logits for text {i} ({texts[i][:60]!r}) are NaN or infinite "
                           "(its weights or LM head overflow)")


@torch.no_grad()
def top_tokens(emb, texts, k=10, what="inspect"):
    """The paper's token-alignment view: top-k of softmax(lm_head(h(x))), and per text the share
    of those k tokens that occur among the input's token ids (hit@k is that share > 0). NaN or
    infinite logits are an error naming the text, not a row of NaN probabilities."""
    logits = emb.model.token_logits(emb.embed(texts))  # [B, V]
    check_logits(logits, texts, 0, what)
    probs = logits.softmax(-1)  # [B, V]
    p, ids = probs.topk(k, dim=-1)  # [B, k]
    inputs = emb.tokenizer.encode(texts, add_special_tokens=False, max_length=emb.max_length)
    hits = [len(set(row.tolist()) & set(inp)) / k for row, inp in zip(ids, inputs)]  # overlap@k
    return p, ids, hits


@torch.no_grad()
def background_sum(embedder, texts, batch_size=32, progress=None):
    """The local shard's part of the background -> (sum of logits z(x) [V] float64, count).
    All-reduce both over data-parallel ranks, then theta = sum / count. `embedder` is the
    teacher: with LoRA, the caller switches the student's adapter off around this call."""
    texts = list(texts)
    if not texts:
        raise TargetsError("background_sum: no texts given (an empty shard has no logits to sum)")
    total = 0
    with eval_mode(embedder.model):
        for start in range(0, len(texts), batch_size):
            z = embedder.model.token_logits(embedder.embed(texts[start:start + batch_size]))  # [B, V] fp32
            check_logits(z, texts, start, "background logits")
            total = total + z.double().sum(0)  # [V]; float64 so a million texts add up without drift
            if progress:
                progress(min(start + batch_size, len(texts)), len(texts))
    return total, len(texts)


def background_logits(embedder, texts, batch_size=32, progress=None) -> torch.Tensor:
    """theta [V] fp32: the mean of the teacher's logits over the texts (logits, not probabilities)."""
    total, count = background_sum(embedder, texts, batch_size, progress)
    return (total / count).float()


def topk_sparse(q, k=64):
    """q [B, V] -> (ids int32 [B, k], weights float32 [B, k]): the top-k entries, heaviest first,
    renormalised; -1 / 0 in slots beyond q's support (or beyond V)."""
    vals, idx = q.float().topk(min(k, q.shape[-1]), dim=-1)  # [B, min(k, V)]
    keep = vals > 0
    ids = torch.where(keep, idx, -1).to(torch.int32)
    w = torch.where(keep, vals, 0.0)
    w = w / w.sum(-1, keepdim=True)
    pad = k - ids.shape[-1]  # only when V < k
    return F.pad(ids, (0, pad), value=-1), F.pad(w, (0, pad), value=0.0)


@torch.no_grad()
def precompute_model_derived(embedder, texts, background, tau, k=64, batch_size=32, progress=None):
    """Stage-2 targets of a corpus from the teacher (see background_sum)
    -> (ids int32 [N, k], weights float32 [N, k]), row i = text i, heaviest id first.
    Texts are batched longest first (characters: less padding) and put back in order."""
    texts = list(texts)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    ids = torch.full((len(texts), k), -1, dtype=torch.int32)
    weights = torch.zeros((len(texts), k), dtype=torch.float32)
    with eval_mode(embedder.model):
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            z = embedder.model.token_logits(embedder.embed([texts[i] for i in rows]))  # [B, V]
            check_logits(z, [texts[i] for i in rows], 0, "stage-2 targets")
            q = model_derived_target(z, background.to(z.device), tau)  # [B, V]
            batch_ids, batch_weights = topk_sparse(q, k)  # [B, k] each
            ids[rows], weights[rows] = batch_ids.cpu(), batch_weights.cpu()
            if progress:
                progress(min(start + batch_size, len(order)), len(order))
    return ids, weights


# -----------------------------------------------------------------------------
# Loss


def kl_loss(logits, target) -> torch.Tensor:
    """KL(q || softmax(logits)) summed over the vocabulary, averaged over the batch, in fp32.
    target: dense q [B, V], or sparse (ids [B, k] with -1 empty slots, weights [B, k]); the sparse
    form never builds [B, V]: sum_j w_j (log w_j - log p[ids_j]) over the filled slots, / B."""
    logp = F.log_softmax(logits.float(), dim=-1)  # [B, V]
    if isinstance(target, torch.Tensor):
        return F.kl_div(logp, target.float(), reduction="batchmean")
    ids, w = target
    filled = ids >= 0  # [B, k]
    if not filled.any(-1).all():
        raise TargetsError("kl_loss: a row of the sparse target is empty (skip texts with no target)")
    logp_ids = logp.gather(-1, ids.long().clamp(min=0))  # [B, k]; empty slots read id 0, masked below
    w = w.float()
    terms = torch.special.xlogy(w, w) - w * logp_ids  # [B, k]
    return torch.where(filled, terms, 0.0).sum() / logits.shape[0]


# -----------------------------------------------------------------------------
# Storage: targets.safetensors


def check_targets(ids, weights, where: str):
    """Raises TargetsError naming `where` unless ids int32 [N, k] / weights float32 [N, k] form
    valid sparse targets: ids >= -1, weights >= 0 and 0 in empty slots, each row summing to 1
    (or entirely empty: a text without target)."""
    if ids.dtype != torch.int32 or weights.dtype != torch.float32:
        raise TargetsError(f"{where}: ids must be int32 and weights float32, got {ids.dtype} and {weights.dtype}")
    if ids.ndim != 2 or ids.shape != weights.shape:
        raise TargetsError(f"{where}: ids {tuple(ids.shape)} and weights {tuple(weights.shape)} "
                           "must be the same [N, k]")
    nonfinite = ~torch.isfinite(weights).all(-1)  # [N]; NaN would pass every comparison below
    if nonfinite.any():
        raise TargetsError(f"{where}: row {int(nonfinite.nonzero()[0])} of weights holds NaN or infinite values")
    filled = ids >= 0
    if (ids < -1).any() or (weights < 0).any() or (weights[~filled] != 0).any():
        raise TargetsError(f"{where}: ids below -1, negative weights, or weight in an empty (-1) slot")
    sums = weights.double().sum(-1)
    bad = ((sums - 1).abs() > ROW_SUM_TOL) & filled.any(-1)
    if bad.any():
        r = int(bad.nonzero()[0])
        raise TargetsError(f"{where}: row {r} of weights sums to {float(sums[r]):.6f}, not 1 (tolerance {ROW_SUM_TOL})")


def save_targets(path, ids, weights, header: dict):
    """Writes ids / weights and the JSON header (metadata key "text2token") to `path` through
    files.write_atomic: a crash, a stop signal or a full disk never leaves half a file (a failed
    write is a WriteError naming the path and the cause)."""
    path = Path(path)
    check_targets(ids, weights, f"{path} (about to write)")
    metadata = {HEADER_KEY: json.dumps(header)}
    tensors = {"ids": ids.contiguous(), "weights": weights.contiguous()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_targets(path):
    """-> (ids int32 [N, k], weights float32 [N, k], header dict), checked (see check_targets; NaN
    and inf weights are refused). Token ids are checked against a vocabulary by the caller, who
    knows the model (t2t.py train)."""
    path = Path(path)
    if not path.is_file():
        raise TargetsError(f"{path}: targets file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, keys = f.metadata() or {}, set(f.keys())
            for key in ("ids", "weights"):
                if key not in keys:
                    raise TargetsError(f"{path}: tensor {key!r} missing (found {sorted(keys)})")
            ids, weights = f.get_tensor("ids"), f.get_tensor("weights")
    except (SafetensorError, OSError) as e:
        raise TargetsError(f"{path}: not a readable safetensors file ({e})") from None
    if HEADER_KEY not in metadata:
        raise TargetsError(f"{path}: metadata key {HEADER_KEY!r} missing (found {sorted(metadata)})")
    try:
        header = json.loads(metadata[HEADER_KEY])
    except (ValueError, RecursionError) as e:  # JSONDecodeError, json's int-size limit, deep nesting
        raise TargetsError(f"{path}: metadata {HEADER_KEY!r} is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise TargetsError(f"{path}: metadata {HEADER_KEY!r} must be a JSON object, got {type(header).__name__}")
    check_targets(ids, weights, str(path))
    return ids, weights, header
