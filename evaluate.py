"""The built-in evaluator: STS and retrieval scored the way MTEB scores them, MTEB-layout results.

What is here, top to bottom: readers for STS files (the STS Benchmark's original release, or
TSV/CSV/JSONL with sentence1/sentence2/score) and BEIR retrieval folders; the metrics, in numpy,
with MTEB's keys and semantics (pytrec_eval/trec_eval for ndcg/map/recall/precision/hit_rate,
MTEB's own code for mrr; scipy's Pearson/Spearman for STS); exact search; a TF-IDF bag-of-words
reference row; the MTEB v2 result writer; an adapter that lets `mteb.evaluate` run our embedder;
and the command line (`python evaluate.py` scores the bundled model and the demo runs).
README.md, "Evaluation", states the protocol. Any object with `encode(texts, batch_size) -> [n, d] float32`
can be scored: our `model.Embedder`, or a sentence-transformers model.

Dimensions: n texts, d embedding size, nq queries, nd documents.

Not included: MTEB task types other than STS and retrieval, approximate search, query/document
prompts per task, multilingual subsets, MTEB's nauc_* confidence metrics, CO2 tracking.
"""

import argparse
import codecs
import hashlib
import json
import math
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
BUNDLED_MODEL = ROOT / "data" / "models" / "stories260K"
BUNDLED_TASKS = {  # name -> (kind, path); the names are MTEB's task names
    "STSBenchmark": ("sts", ROOT / "data" / "stsbenchmark" / "sts-test.csv"),
    "SciFact": ("retrieval", ROOT / "data" / "scifact"),
}
# Dev sets for choosing settings during training (never the test splits above): STS Benchmark's dev
# split, and 100 of SciFact's *train* queries against 400 documents (bench/make_retrieval_dev.py).
DEV_TASKS = {
    "STSBenchmarkDev": ("sts", ROOT / "data" / "stsbenchmark" / "sts-dev.csv"),
    "SciFactDev": ("retrieval", ROOT / "data" / "scifact_dev"),
}
WIKI_SAMPLE = ROOT / "data" / "wiki1m_sample" / "wiki1m_for_simcse.head11913.txt"
DEMO_RUNS = ("runs/demo/stage1", "runs/demo/stage2")  # relative to the cwd, like t2t.py's --out

K_VALUES = (1, 3, 5, 10, 20, 100, 1000)  # MTEB's retrieval cutoffs
TOP_K = 1000  # documents kept per query, as MTEB's search does
MTEB_FORMAT = "2.0.0"  # the result layout follows mteb 2.x; a parseable version, mteb's loader compares it
LANGUAGES = ["eng-Latn"]
ENCODE_CHUNK = 256  # texts per encode() call: the progress line moves after each chunk


class EvalError(ValueError):
    """A user-facing problem with an evaluation input (a data file, a task name, a setting)."""


class NonFiniteError(EvalError):
    """NaN or inf where a number must be: an embedding (the text is named) or a score (the key)."""


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# Readers


@dataclass
class STSData:
    sentences1: list
    sentences2: list
    scores: np.ndarray  # [n] gold similarity, any scale (correlations ignore affine changes)


@dataclass
class RetrievalData:
    doc_ids: list
    docs: list  # (title + " " + text).strip(), as MTEB builds a document
    query_ids: list  # only the queries with at least one qrel in the split
    queries: list
    qrels: dict  # query id -> {doc id: graded relevance (int)}
    n_queries_read: int


def text_lines(path, error=None):
    """Yields (line number, line) of a UTF-8 text file, by the rules every text reader here and in
    t2t.py follows: a BOM at the start of the file is dropped; a line ends at "\\n", and a "\\r"
    just before it (or at the end of the file) belongs to the line end, so CRLF files read as LF
    files; every other character is text, including a lone "\\r", U+2028 and form feeds (where
    str.splitlines would cut, shifting every later line number); no line is too long. A NUL byte,
    or bytes that are not UTF-8, raise `error` (EvalError) naming the file and line: both mean a
    binary, UTF-16 or corrupted file, not text. Streams: the file is never held whole."""
    path, error = Path(path), error or EvalError
    try:
        with open(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):  # a file opened as binary splits on b"\n" only
                raw = raw.removesuffix(b"\n").removesuffix(b"\r")
                if n == 1:
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                if b"\0" in raw:
                    column = raw.index(b"\0") + 1
                    raise error(f"{path}:{n}: NUL byte at column {column} (a binary, UTF-16 or corrupted file?)")
                try:
                    yield n, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise error(f"{path}:{n}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None


def parse_json_line(line, where):
    """One JSON line -> value; any JSON error (also: an integer of thousands of digits, nesting too
    deep for Python) is an EvalError naming `where`."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise EvalError(f"{where}: not valid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:
        raise EvalError(f"{where}: not valid JSON ({e})") from None


def parse_score(value, where):
    """A gold score: a number, or a string of one; finite (JSON true/false are not scores)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise EvalError(f"{where}: score {value!r} is not a number")
    try:
        score = float(value)
    except (ValueError, OverflowError):
        raise EvalError(f"{where}: score {value!r} is not a number") from None
    if not math.isfinite(score):
        raise EvalError(f"{where}: score {value!r} is not a finite number")
    return score


def read_sts(path) -> STSData:
    """An STS file -> pairs and gold scores. `.jsonl`: one object a line; a first line naming
    sentence1/sentence2/score: a headed TSV (CSV, quote-aware, for `.csv`); otherwise the STS
    Benchmark's original layout: tab-separated, score in field 4, sentences in fields 5 and 6
    (split on tabs only: its sentences contain quote characters). Lines follow text_lines; blank
    lines are skipped (they hold no pair); sentences are kept as written (JSON: must be strings);
    scores must be finite."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such STS file")
    lines = list(text_lines(path))  # [(line number, line)]
    header = split_row(lines[0][1], path.suffix, f"{path}:1") if lines and path.suffix != ".jsonl" else []
    if path.suffix == ".jsonl":
        parse, skip = jsonl_pair, 0
    elif {"sentence1", "sentence2", "score"} <= set(header):
        parse, skip = (lambda line, where: headed_pair(split_row(line, path.suffix, where), header, where)), 1
    else:
        parse, skip = stsbenchmark_pair, 0
    rows = [parse(line, f"{path}:{n}") for n, line in lines[skip:] if line.strip()]
    if not rows:
        raise EvalError(f"{path}: no sentence pairs")
    s1, s2, scores = zip(*rows)
    return STSData(list(s1), list(s2), np.array(scores, dtype=np.float64))


def split_row(line, suffix, where):
    if suffix == ".csv":
        import csv  # only headed CSVs use quoting; the STS Benchmark's own .csv files are not CSV
        try:
            return next(csv.reader([line]), [])
        except csv.Error as e:  # e.g. a lone "\r" outside quotes, a field over csv's size limit
            raise EvalError(f"{where}: not a CSV row ({e})") from None
    return line.split("\t")


def jsonl_pair(line, where):
    obj = parse_json_line(line, where)
    missing = [k for k in ("sentence1", "sentence2", "score") if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise EvalError(f"{where}: missing key(s) {', '.join(missing)}")
    for key in ("sentence1", "sentence2"):
        if not isinstance(obj[key], str):
            raise EvalError(f"{where}: {key} must be a string, got {obj[key]!r}")
    return obj["sentence1"], obj["sentence2"], parse_score(obj["score"], where)


def headed_pair(fields, header, where):
    if len(fields) != len(header):
        raise EvalError(f"{where}: {len(fields)} fields, the header has {len(header)}")
    row = dict(zip(header, fields))
    return row["sentence1"], row["sentence2"], parse_score(row["score"], where)


def stsbenchmark_pair(line, where):
    f = line.split("\t")  # genre, file, years, id, score, sentence1, sentence2 [, source1, source2]
    if len(f) < 7:
        raise EvalError(f"{where}: {len(f)} tab-separated fields, the STS Benchmark layout has at least 7 "
                        f"(score in field 4, sentences in 5 and 6), or give a header naming sentence1/sentence2/score")
    return f[5], f[6], parse_score(f[4], where)


def read_jsonl_texts(path, build):
    """corpus.jsonl / queries.jsonl -> {id: text}; `build(obj)` makes the text of one object.
    Lines follow text_lines, blank ones skipped; each object needs an '_id' (a string or an
    integer) and a string 'text'; a 'title' must be a string or null."""
    out = {}
    for i, line in text_lines(path):
        if not line.strip():
            continue
        obj = parse_json_line(line, f"{path}:{i}")
        if not isinstance(obj, dict) or "_id" not in obj or not isinstance(obj.get("text"), str):
            raise EvalError(f"{path}:{i}: needs '_id' and a string 'text'")
        if isinstance(obj["_id"], bool) or not isinstance(obj["_id"], (str, int)):
            raise EvalError(f"{path}:{i}: '_id' must be a string or an integer, got {obj['_id']!r}")
        if not isinstance(obj.get("title"), (str, type(None))):
            raise EvalError(f"{path}:{i}: 'title' must be a string or null, got {obj['title']!r}")
        key = str(obj["_id"])
        if key in out:
            raise EvalError(f"{path}:{i}: duplicate _id {key!r}")
        out[key] = build(obj)
    return out


def doc_text(obj):
    title = obj.get("title") or ""
    return (title + " " + obj["text"]).strip() if title else obj["text"].strip()


def read_qrels(path):
    """qrels/<split>.tsv (query-id, corpus-id, score; a header row) -> {query id: {doc id: int}}.
    Lines follow text_lines, blank ones skipped; a pair judged twice with different scores is an
    error (which one would count?)."""
    qrels, first_seen = {}, {}
    for i, line in text_lines(path):
        if not line.strip():
            continue
        f = line.split("\t")
        if i == 1 and f[:1] == ["query-id"]:
            continue  # BEIR's header row
        if len(f) != 3:
            raise EvalError(f"{path}:{i}: {len(f)} tab-separated fields, expected 3 (query-id, corpus-id, score)")
        try:
            rel = int(f[2])  # trec_eval's relevance levels are integers
        except ValueError:
            raise EvalError(f"{path}:{i}: score {f[2]!r} is not an integer") from None
        if qrels.get(f[0], {}).get(f[1], rel) != rel:
            raise EvalError(f"{path}:{i}: query {f[0]!r}, document {f[1]!r} judged {rel} here and "
                            f"{qrels[f[0]][f[1]]} at line {first_seen[f[0], f[1]]}")
        first_seen.setdefault((f[0], f[1]), i)
        qrels.setdefault(f[0], {})[f[1]] = rel
    return qrels


def beir_files(folder, split):
    return [folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels" / f"{split}.tsv"]


def read_beir(folder, split="test") -> RetrievalData:
    """A BEIR folder -> documents, the queries that have qrels in `split`, and the qrels. Every
    file follows text_lines (UTF-8, a BOM dropped, CRLF a line end, NUL refused); a malformed line
    is an EvalError naming the file and line (read_jsonl_texts, read_qrels), never skipped."""
    folder = Path(folder)
    files = beir_files(folder, split)
    for f in files:
        if not f.is_file():
            raise EvalError(f"{folder}: missing {f.relative_to(folder)} (a BEIR folder has corpus.jsonl, "
                            f"queries.jsonl and qrels/<split>.tsv)")
    corpus = read_jsonl_texts(files[0], doc_text)
    queries = read_jsonl_texts(files[1], lambda obj: obj["text"])
    qrels = read_qrels(files[2])
    unknown = sorted(set(qrels) - set(queries))
    if unknown:
        raise EvalError(f"{files[2]}: query id {unknown[0]!r} is not in {files[1]} ({len(unknown)} such)")
    # MTEB keeps only the queries with at least one qrel in the split (any grade, 0 included)
    kept = [q for q in queries if qrels.get(q)]
    return RetrievalData(list(corpus), list(corpus.values()), kept, [queries[q] for q in kept],
                         {q: qrels[q] for q in kept}, len(queries))


def resolve_task(name_or_path):
    """A bundled task name or a path -> (task name, kind, path)."""
    if name_or_path in BUNDLED_TASKS or name_or_path in DEV_TASKS:
        kind, path = {**BUNDLED_TASKS, **DEV_TASKS}[name_or_path]
        return name_or_path, kind, path
    path = Path(name_or_path)
    if path.is_dir():
        return path.resolve().name, "retrieval", path
    if path.is_file():
        return path.stem, "sts", path
    raise EvalError(f"task {name_or_path!r}: not a bundled task ({', '.join([*BUNDLED_TASKS, *DEV_TASKS])}), "
                    f"an STS file or a BEIR folder")


def dataset_revision(task, split="test", n=12):
    """The sha256 of a task's data files, first n hex digits: what 'dataset_revision' records."""
    name, kind, path = resolve_task(task)
    h = hashlib.sha256()
    for f in [path] if kind == "sts" else beir_files(Path(path), split):
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:n]


# -----------------------------------------------------------------------------
# Metrics (numpy; the references are scipy, pytrec_eval and MTEB's retrieval_metrics.py)


def pearson(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    return float((xc @ yc) / math.sqrt((xc @ xc) * (yc @ yc)))


def average_ranks(x):
    """Ranks 1..n, ties sharing their average rank (scipy.stats.rankdata's 'average')."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new_group = np.r_[True, xs[1:] != xs[:-1]]  # [n] a tie group starts here
    starts = np.flatnonzero(np.r_[new_group, True])  # group boundaries, with n at the end
    mean_rank = (starts[:-1] + starts[1:] + 1) / 2  # average of ranks start+1 .. end
    ranks = np.empty(len(x))
    ranks[order] = mean_rank[np.cumsum(new_group) - 1]
    return ranks


def spearman(x, y):
    return pearson(average_ranks(x), average_ranks(y))


def sts_metrics(gold, cosine, manhattan, euclidean) -> dict:
    """MTEB's STS keys from per-pair cosine similarity and (negated) L1/L2 distances."""
    out = {}
    for name, sim in (("cosine", cosine), ("manhattan", manhattan), ("euclidean", euclidean)):
        out[f"{name}_pearson"] = pearson(gold, sim)
        out[f"{name}_spearman"] = spearman(gold, sim)
    # 'pearson'/'spearman' use the model's own similarity in MTEB; ours is cosine
    out["pearson"], out["spearman"] = out["cosine_pearson"], out["cosine_spearman"]
    out["main_score"] = out["cosine_spearman"]
    return out


def unit_rows(x):
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]  # [n, 1]
    return x / np.where(norms == 0, 1, norms)  # a zero vector stays zero


def pair_similarities(a, b):
    """a, b [n, d] -> per pair: cosine, -manhattan, -euclidean (higher = more similar). The float32
    arithmetic of sklearn's paired_*_distances, which MTEB uses: cosine = 1 - |a/|a| - b/|b||^2 / 2,
    so that identical sentences score exactly 1 and ties fall as they do in MTEB's Spearman."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    diff = unit_rows(a) - unit_rows(b)
    cosine = 1 - 0.5 * np.einsum("ij,ij->i", diff, diff)
    return cosine, -np.abs(a - b).sum(1), -np.sqrt(np.einsum("ij,ij->i", a - b, a - b))


def rank_documents(scores, query_ids, doc_ids, top_k=TOP_K, ignore_identical_ids=False):
    """scores [nq, nd] -> {query id: top_k doc ids, best first}. Ties go by doc id descending, as
    trec_eval sorts a run (score, then docno, both descending), so our ranking is the one it scores.
    Like MTEB, identical ids are dropped after the top k is taken."""
    doc_rank = np.empty(len(doc_ids), np.int64)
    doc_rank[sorted(range(len(doc_ids)), key=doc_ids.__getitem__)] = np.arange(len(doc_ids))  # string order
    run = {}
    for qid, row in zip(query_ids, scores):
        cand = np.arange(len(row))
        if len(row) > top_k:  # keep every doc tied with the k-th score, then sort exactly
            cand = np.flatnonzero(row >= np.partition(row, -top_k)[-top_k])
        best = cand[np.lexsort((-doc_rank[cand], -row[cand]))[:top_k]]
        run[qid] = [doc_ids[j] for j in best if not (ignore_identical_ids and doc_ids[j] == qid)]
    return run


def query_metrics(ranked, rels, k_values):
    """One query: ranked doc ids and its qrels {doc: grade} -> {metric@k: value}, trec_eval's way:
    gains are the grades (negatives count 0), relevant means grade > 0, precision divides by k,
    recall and average precision by all relevant docs, IDCG from all judged relevant docs."""
    grades = np.array([rels.get(d, 0) for d in ranked], np.float64)  # [n] 0 = unjudged
    hit = grades > 0
    n_rel = sum(1 for g in rels.values() if g > 0)
    ideal = np.sort(np.array([g for g in rels.values() if g > 0], np.float64))[::-1]
    dcg = np.cumsum(np.maximum(grades, 0) / np.log2(np.arange(2, len(grades) + 2)))  # DCG@1..n
    idcg = np.cumsum(ideal / np.log2(np.arange(2, len(ideal) + 2)))
    hits = np.cumsum(hit)  # relevant docs in the top 1..n
    ap = np.cumsum(np.where(hit, hits / np.arange(1, len(grades) + 1), 0.0))  # sum of precision at each hit
    first = int(np.argmax(hit)) if hit.any() else None  # 0-based rank of the first relevant doc
    out = {}
    for k in k_values:
        m = min(k, len(grades))  # docs actually ranked within the cutoff
        at = lambda c: float(c[m - 1]) if m else 0.0  # noqa: E731  (cumulative value at the cutoff)
        out[f"ndcg_at_{k}"] = at(dcg) / float(idcg[min(k, len(ideal)) - 1]) if len(ideal) else 0.0
        out[f"map_at_{k}"] = at(ap) / n_rel if n_rel else 0.0
        out[f"recall_at_{k}"] = at(hits) / n_rel if n_rel else 0.0
        out[f"precision_at_{k}"] = at(hits) / k
        # MTEB's own mrr: reciprocal rank of the first relevant doc within k (qrels > 0)
        out[f"mrr_at_{k}"] = 1.0 / (first + 1) if first is not None and first < k else 0.0
        out[f"hit_rate_at_{k}"] = 1.0 if first is not None and first < k else 0.0  # trec_eval 'success'
    return out


def retrieval_metrics(run, qrels, k_values=K_VALUES) -> dict:
    """{query id: ranked doc ids}, {query id: {doc id: grade}} -> MTEB's retrieval keys, averaged
    over the queries that have both a ranking and qrels (the ones pytrec_eval evaluates)."""
    per_query = [query_metrics(run[q], qrels[q], k_values) for q in run if q in qrels]
    if not per_query:
        raise EvalError("no query has both a ranking and qrels: nothing to score")
    keys = [f"{m}_at_{k}" for m in ("ndcg", "map", "recall", "precision", "mrr", "hit_rate") for k in k_values]
    out = {key: float(np.mean([s[key] for s in per_query])) for key in keys}
    if 1 in k_values:
        out["accuracy"] = out["recall_at_1"]  # MTEB's 'accuracy' is recall@1
    if 10 in k_values:
        out["main_score"] = out["ndcg_at_10"]
    return out


# -----------------------------------------------------------------------------
# Encoders and the two task types


def encode(encoder, texts, batch_size, label):
    """encoder.encode in chunks, so that a long encode shows progress (a \\r line on stderr)."""
    out, t0, show = [], time.time(), len(texts) > ENCODE_CHUNK
    for start in range(0, len(texts), ENCODE_CHUNK):
        chunk = texts[start: start + ENCODE_CHUNK]
        emb = np.asarray(encoder.encode(chunk, batch_size=batch_size), dtype=np.float32)  # [c, d]
        if emb.ndim != 2 or emb.shape[0] != len(chunk):
            raise EvalError(f"encoder returned shape {emb.shape} for {len(chunk)} texts, expected [n, d]")
        out.append(emb)
        if show:
            done = start + len(chunk)
            print(f"\r  {label}: {done}/{len(texts)} texts, {done / (time.time() - t0):.0f} texts/s",
                  end="", file=sys.stderr, flush=True)
    if show:
        print(file=sys.stderr)
    emb = np.concatenate(out)
    bad = ~np.isfinite(emb).all(1)  # [n]
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise NonFiniteError(f"{label}: the encoder returned a NaN or infinite embedding for text {i} "
                             f"({texts[i][:60]!r}; {int(bad.sum())} of {len(texts)} texts)")
    return emb


def evaluate_sts(encoder, path_or_name, batch_size=32) -> dict:
    """Score an encoder on an STS file or a bundled STS task; MTEB's STS keys."""
    name, kind, path = resolve_task(path_or_name)
    data = read_sts(path)
    log(f"{name}: {len(data.scores)} pairs read from {path}")
    if data.scores.min() == data.scores.max():  # also: a single pair
        raise EvalError(f"{path}: the gold scores of all {len(data.scores)} pair(s) are equal; "
                        "correlations with them are undefined")
    # two encode calls, first sentences then second ones, as MTEB's STS evaluator does
    e1 = encode(encoder, data.sentences1, batch_size, f"{name} sentence1")
    e2 = encode(encoder, data.sentences2, batch_size, f"{name} sentence2")
    return sts_metrics(data.scores, *pair_similarities(e1, e2))


def similarity_rows(q, d, similarity, doc_chunk=8192):
    """q [nq, d], d [nd, d] -> float32 scores [nq, nd]: cosine (L2-normalise both) or raw dot product.
    Accumulated in float64 and rounded once to float32: each score is (all but always) the float32
    nearest the exact dot product of the float32 embeddings, whatever blocks it is computed in and
    whatever the BLAS kernel (bit-identical under OpenBLAS' Haswell, SkylakeX and Core2 kernels, in 256-query blocks,
    1000-document chunks or one call). A float32 matmul rounds an element differently when it falls
    in another tile (Haswell kernel: 27462 of SciFact's 300 x 5183 hashed-BOW scores differ between
    256-query blocks and one 300-query call), which reorders documents closer than one float32 step
    (SciFact query 575: doc 427082 beats the relevant 10300888 by 1.25e-9, a 24th of a step), so the
    same embeddings got one mrr_at_1000 from mteb.evaluate (all queries in one call), another from
    evaluate_retrieval (256 at a time), and others on other CPUs."""
    if similarity == "cosine":
        q, d = unit_rows(q), unit_rows(d)
    elif similarity != "dot":
        raise EvalError(f"similarity {similarity!r} is not supported (cosine or dot)")
    q = np.asarray(q, np.float64)
    out = np.empty((len(q), len(d)), np.float32)
    for start in range(0, len(d), doc_chunk):  # bounds the float64 copies: [doc_chunk, d] and [nq, doc_chunk]
        out[:, start: start + doc_chunk] = q @ np.asarray(d[start: start + doc_chunk], np.float64).T
    return out


def evaluate_retrieval(encoder, path_or_name, similarity="cosine", split="test", ignore_identical_ids=False,
                       batch_size=32) -> dict:
    """Score an encoder on a BEIR folder or a bundled retrieval task: exact search over the whole
    corpus, top 1000 per query, MTEB's retrieval keys."""
    name, kind, path = resolve_task(path_or_name)
    data = read_beir(path, split)
    log(f"{name}: {len(data.doc_ids)} documents, {data.n_queries_read} queries read; {len(data.query_ids)} with "
        f"qrels in '{split}' kept, {data.n_queries_read - len(data.query_ids)} without dropped")
    q = encode(encoder, data.queries, batch_size, f"{name} queries")  # [nq, d]
    d = encode(encoder, data.docs, batch_size, f"{name} corpus")  # [nd, d]
    run = {}
    for start in range(0, len(q), 256):  # 256 queries at a time bounds the [nq, nd] score block
        scores = similarity_rows(q[start: start + 256], d, similarity)
        run.update(rank_documents(scores, data.query_ids[start: start + 256], data.doc_ids,
                                  ignore_identical_ids=ignore_identical_ids))
    return retrieval_metrics(run, data.qrels)


def evaluate_task(encoder, task, similarity="cosine", batch_size=32, ignore_identical_ids=False):
    """One task by name or path: STS or retrieval, whichever it is. A BEIR folder is scored on its
    `test` split, or on its only split when it has one (SciFactDev: `dev`)."""
    name, kind, path = resolve_task(task)
    if kind == "sts":
        return evaluate_sts(encoder, task, batch_size=batch_size)
    return evaluate_retrieval(encoder, task, similarity, split=only_split(path),
                              ignore_identical_ids=ignore_identical_ids, batch_size=batch_size)


def only_split(folder) -> str:
    """`test` if the BEIR folder has qrels/test.tsv, else its one qrels file's split."""
    splits = sorted(f.stem for f in (Path(folder) / "qrels").glob("*.tsv"))
    if "test" in splits or len(splits) != 1:
        return "test"  # read_beir names the missing file when there is no test split
    return splits[0]



# -----------------------------------------------------------------------------
# TF-IDF reference row: bag of words, idf from the Wikipedia sample plus the task's own texts


def words(text):
    return re.findall(r"\w+", text.lower())


def tfidf_vectors(texts, background):
    """texts -> one {word: weight} per text, L2-normalised; idf = ln(N / df) over `background` plus
    `texts`, tf = raw count."""
    bags = [Counter(words(t)) for t in texts]
    df = Counter()
    for bag in bags:
        df.update(bag.keys())
    for line in background:
        df.update(set(words(line)))
    n = len(texts) + len(background)
    vectors = []
    for bag in bags:
        v = {w: c * math.log(n / df[w]) for w, c in bag.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        vectors.append({w: x / norm for w, x in v.items()})
    return vectors


def sparse_pair_similarities(v1, v2):
    """Per pair of sparse vectors: cosine (they are unit length), -manhattan, -euclidean."""
    cos, l1, l2 = [], [], []
    for a, b in zip(v1, v2):
        keys = a.keys() | b.keys()
        cos.append(sum(a[w] * b[w] for w in a.keys() & b.keys()))
        l1.append(-sum(abs(a.get(w, 0.0) - b.get(w, 0.0)) for w in keys))
        l2.append(-math.sqrt(sum((a.get(w, 0.0) - b.get(w, 0.0)) ** 2 for w in keys)))
    return np.array(cos), np.array(l1), np.array(l2)


def sparse_scores(queries, docs):
    """Sparse unit vectors -> cosine scores [nq, nd], through an inverted index of the query words."""
    wanted = {w for q in queries for w in q}
    postings = {w: ([], []) for w in wanted}  # word -> (doc indices, weights)
    for j, d in enumerate(docs):
        for w, x in d.items():
            if w in wanted:
                postings[w][0].append(j)
                postings[w][1].append(x)
    scores = np.zeros((len(queries), len(docs)))
    for i, q in enumerate(queries):
        for w, x in q.items():
            scores[i, postings[w][0]] += x * np.array(postings[w][1])
    return scores


def evaluate_tfidf(task, split=None, ignore_identical_ids=False) -> dict:
    """The reference row: STS pairs or exact retrieval with TF-IDF vectors (table only, no result
    files: it is a yardstick, not a model)."""
    name, kind, path = resolve_task(task)
    background = WIKI_SAMPLE.read_text(encoding="utf-8").splitlines()
    if kind == "sts":
        data = read_sts(path)
        vectors = tfidf_vectors(data.sentences1 + data.sentences2, background)
        n = len(data.sentences1)
        return sts_metrics(data.scores, *sparse_pair_similarities(vectors[:n], vectors[n:]))
    data = read_beir(path, split or only_split(path))
    vectors = tfidf_vectors(data.queries + data.docs, background)
    scores = sparse_scores(vectors[:len(data.queries)], vectors[len(data.queries):])
    run = rank_documents(scores, data.query_ids, data.doc_ids, ignore_identical_ids=ignore_identical_ids)
    return retrieval_metrics(run, data.qrels)


# BM25 reference row (retrieval only): Okapi BM25 over lower-cased words with the stage-1 stopwords
# removed, no stemming; k1 0.9 and b 0.4 as Pyserini's BEIR baselines; Lucene's idf
# ln(1 + (N - df + 0.5) / (df + 0.5)), which is never negative. Statistics from the task's corpus.
BM25_K1, BM25_B = 0.9, 0.4


def bm25_scores(queries, docs, stopwords=frozenset(), k1=BM25_K1, b=BM25_B) -> np.ndarray:
    """Query and document texts -> BM25 scores [nq, nd]: sum over the query's words (each
    occurrence counts) of idf(w) * tf (k1 + 1) / (tf + k1 (1 - b + b |d| / avgdl))."""
    bags = [Counter(w for w in words(d) if w not in stopwords) for d in docs]
    lengths = np.array([sum(bag.values()) for bag in bags], dtype=np.float64)
    norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1e-9))  # [nd]
    postings = {}  # word -> (doc indices, term frequencies)
    for j, bag in enumerate(bags):
        for w, tf in bag.items():
            postings.setdefault(w, ([], []))
            postings[w][0].append(j)
            postings[w][1].append(tf)
    scores = np.zeros((len(queries), len(docs)))
    for i, q in enumerate(queries):
        for w, qtf in Counter(w for w in words(q) if w not in stopwords).items():
            if w not in postings:
                continue
            idx, tf = np.array(postings[w][0]), np.array(postings[w][1], dtype=np.float64)
            idf = math.log(1 + (len(docs) - len(idx) + 0.5) / (len(idx) + 0.5))
            scores[i, idx] += qtf * idf * tf * (k1 + 1) / (tf + norm[idx])
    return scores


def evaluate_bm25(task, split=None, ignore_identical_ids=False) -> dict:
    """The BM25 reference row of a retrieval task (table only, like TF-IDF)."""
    import targets  # the stage-1 stopword list
    name, kind, path = resolve_task(task)
    if kind != "retrieval":
        raise EvalError(f"{name}: BM25 is a retrieval baseline; {name} is an STS task")
    data = read_beir(path, split or only_split(path))
    scores = bm25_scores(data.queries, data.docs, frozenset(targets.stopwords()))
    run = rank_documents(scores, data.query_ids, data.doc_ids, ignore_identical_ids=ignore_identical_ids)
    return retrieval_metrics(run, data.qrels)

# -----------------------------------------------------------------------------
# MTEB v2 result files


def round_scores(scores, ndigits=6):
    return {k: round(v, ndigits) if isinstance(v, float) else v for k, v in scores.items()}


def write_json(path, obj):
    """Through files.write_atomic: a kill or a full disk leaves the old file or none, never half of
    one (a failed write is a WriteError naming the path and the cause)."""
    from files import write_atomic  # files.py brings safetensors; the readers and metrics need only numpy
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))


def check_model_name(name):
    """mteb's own rule for a model name (mteb/models/model_meta.py, ModelMeta._check_name, a
    pydantic field validator): a string with a "/" in it, "organization/model_name". We refuse any
    other name first, with this message, rather than let mteb's validation error surface later."""
    if not isinstance(name, str) or "/" not in name:
        raise EvalError(f"model name {name!r}: MTEB accepts only 'organization/name' (a name with a '/'), "
                        f"e.g. 'local/{name}'")
    return name


def model_folder_name(name):
    """The results folder of a model, as mteb's ModelMeta.model_name_as_path writes it."""
    return check_model_name(name).replace("/", "__").replace(" ", "_")


def model_meta(model_name, revision, n_parameters=None, embed_dim=None, max_tokens=None,
               similarity_fn_name="cosine") -> dict:
    """The fields of mteb's ModelMeta that apply to a local model (mteb.models.ModelMeta names)."""
    check_model_name(model_name)
    return dict(name=model_name, revision=revision, n_parameters=n_parameters, embed_dim=embed_dim,
                max_tokens=max_tokens, similarity_fn_name=similarity_fn_name, languages=LANGUAGES,
                framework=["PyTorch"])


def write_mteb_result(task_name, scores, output_dir, model_name, revision, split="test", evaluation_time=None,
                      dataset_revision="local", meta=None) -> Path:
    """Write <output_dir>/<model name, / -> __>/<revision>/<task_name>.json in MTEB's v2 layout, and
    model_meta.json beside it (`meta`: extra ModelMeta fields, e.g. n_parameters, similarity_fn_name).
    Scores are fractions rounded to 6 decimals, as mteb's TaskResult.to_disk writes them. A name
    mteb would refuse (check_model_name) or a NaN / infinite score is refused: nothing is written."""
    if "main_score" not in scores:
        raise EvalError(f"{task_name}: scores have no 'main_score'")
    folder = Path(output_dir) / model_folder_name(model_name) / revision
    for key, value in scores.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise NonFiniteError(f"model {model_name}, task {task_name}: score {key} is {value}; no result file "
                                 "written (constant or degenerate embeddings?)")
    result = {
        "dataset_revision": dataset_revision,
        "task_name": task_name,
        "mteb_version": MTEB_FORMAT,
        "scores": {split: [{**round_scores(scores), "hf_subset": "default", "languages": LANGUAGES}]},
        "evaluation_time": evaluation_time,
        "kg_co2_emissions": None,
    }
    path = folder / f"{task_name}.json"
    write_json(path, result)
    write_json(folder / "model_meta.json", {**model_meta(model_name, revision), **(meta or {})})
    return path


# -----------------------------------------------------------------------------
# The full benchmark: an adapter for mteb.evaluate (mteb 2.x), imported only when used


class MTEBAdapter:
    """Lets `mteb.evaluate` run any encoder of ours, e.g. on MTEB(eng, v2):

        import mteb
        adapter = MTEBAdapter(embedder, model_meta("text2token/stage2", revision, ...))
        mteb.evaluate(adapter, mteb.get_benchmark("MTEB(eng, v2)"))

    mteb 2.x calls encode() with a DataLoader of {"text": [...]} batches and reads the
    `mteb_model_meta` attribute; similarity() feeds its exact search (it calls torch.topk)."""

    def __init__(self, encoder, meta: dict, batch_size=32):
        check_model_name(meta.get("name"))  # before mteb's pydantic validation sees it
        self.encoder, self.meta, self.batch_size = encoder, meta, batch_size

    @property
    def mteb_model_meta(self):
        from mteb.models import ModelMeta
        unknown = dict(loader=None, release_date=None, memory_usage_mb=None, license=None, open_weights=None,
                       public_training_code=None, public_training_data=None, use_instructions=False,
                       training_datasets=None)
        return ModelMeta(**unknown, **self.meta)

    def encode(self, inputs, *, task_metadata=None, hf_split=None, hf_subset=None, prompt_type=None, **kwargs):
        texts = [t for batch in inputs for t in batch["text"]]
        return self.encoder.encode(texts, batch_size=kwargs.get("batch_size", self.batch_size))

    def similarity(self, a, b):
        """[n1, d], [n2, d] -> torch [n1, n2], the scores mteb's exact search ranks."""
        import torch
        return torch.from_numpy(similarity_rows(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                                self.meta["similarity_fn_name"]))

    def similarity_pairwise(self, a, b):
        """[n, d], [n, d] -> torch [n]; cosine by the formula evaluate_sts uses, so that MTEB's
        'spearman' equals its cosine_spearman."""
        import torch
        if self.meta["similarity_fn_name"] == "cosine":
            return torch.from_numpy(pair_similarities(a, b)[0])
        return torch.from_numpy((np.asarray(a, np.float32) * np.asarray(b, np.float32)).sum(-1))


# -----------------------------------------------------------------------------
# Command line


def load_encoder(path, args):
    """A run directory, an HF checkpoint folder or a GGUF file (or model name) -> (Embedder, model name,
    revision, meta fields)."""
    import torch  # checkpoints.py brings torch; the readers and metrics above need only numpy

    import checkpoints
    import model
    path = checkpoints.resolve_model(path)  # a model name (checkpoints.MODEL_NAMES) -> its GGUF file
    if not (checkpoints.path_is(path, "dir") or checkpoints.is_gguf(path)):
        raise EvalError(f"--model {path}: not a directory or a GGUF file (a run directory, an HF checkpoint "
                        f"folder, a .gguf file or a model name)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {args.device}: CUDA is not available here")
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else auto_dtype(args.device, trained_in_bf16(path) or None)
    if checkpoints.is_run_dir(path):  # attention/pooling as trained, unless given as flags
        emb = model.Embedder.from_run(path, device=args.device, dtype=dtype, attention=args.attention,
                                      pooling=args.pooling, max_length=args.max_length)
        name = f"text2token/{path.resolve().name}"
    elif (path / "modules.json").is_file():  # a sentence-transformers folder of t2t.py export: its own settings
        emb = model.Embedder.from_pretrained(path, pooling=args.pooling, attention=args.attention,
                                             max_length=args.max_length, device=args.device, dtype=dtype)
        name = f"local/{path.resolve().name}"
    else:
        emb = model.Embedder.from_pretrained(path, pooling=args.pooling or "mean",
                                             attention=args.attention or "bidirectional",
                                             max_length=args.max_length, device=args.device, dtype=dtype)
        name = f"local/{path.resolve().name}"  # mteb needs "organization/name"
    if args.compile:
        emb.compile()
    revision = checkpoints.weights_sha256(path)
    meta = dict(n_parameters=sum(p.numel() for p in emb.model.parameters()), embed_dim=emb.dim,
                max_tokens=emb.max_length, similarity_fn_name=args.similarity)
    return emb, name, revision, meta


# --dtype auto on a CPU with bf16 units, for models not trained in bf16 (BENCHMARKS.md, "bf16 on
# CPU"): bf16 encodes SmolLM2 2-3x faster with STS-B dev within 0.001 (causal), but moves
# bidirectional models by up to 0.007 and the fp32-trained demo model's documented scores; so auto
# keeps fp32 there and picks bf16 for runs trained with --precision bf16 (trained_in_bf16).
AUTO_BF16_ON_CPU = False


def trained_in_bf16(path) -> bool:
    """Whether `path` is a run directory trained with bf16 autocast (meta.json's precision): --dtype
    auto then scores it with bf16 weights on a CPU with bf16 units, as training saw them."""
    import checkpoints
    return checkpoints.is_run_dir(path) and checkpoints.read_run_meta(path).get("precision") == "bf16"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively: x86 AVX512-BF16 or AMX-BF16, or the Arm BF16
    extension, read from /proc/cpuinfo's flags (Linux; elsewhere False). Without them torch
    emulates bf16 matmuls, slower than fp32."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def auto_dtype(device: str, bf16_on_cpu=None):
    """--dtype auto: bfloat16 on CUDA; on CPU bfloat16 only when bf16_on_cpu (default
    AUTO_BF16_ON_CPU) and the CPU has bf16 units (cpu_has_bf16), else float32."""
    import torch
    if str(device).startswith("cuda"):
        return torch.bfloat16
    use = AUTO_BF16_ON_CPU if bf16_on_cpu is None else bf16_on_cpu
    return torch.bfloat16 if use and cpu_has_bf16() else torch.float32


def print_table(rows, tasks):
    """rows: [(model name, revision, {task name: scores})], tasks: [(name, kind, path)] -> one row
    per model, main scores x100 as leaderboards show them."""
    width = max(len(r[0]) for r in rows + [("model",)])
    label = {"sts": "cos_spearman", "retrieval": "ndcg@10"}
    print(f"{'model':<{width}}  {'revision':<12}" + "".join(f"  {name:>14}" for name, _, _ in tasks))
    print(f"{'':<{width}}  {'':<12}" + "".join(f"  {label[kind]:>14}" for _, kind, _ in tasks))
    for name, revision, results in rows:
        print(f"{name:<{width}}  {revision:<12}" + "".join(
            f"  {100 * results[t]['main_score']:>14.2f}" if t in results else f"  {'-':>14}" for t, _, _ in tasks))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Score embedders on STS and retrieval the MTEB way; write MTEB-layout "
                                            "results. With no arguments: the bundled model and runs/demo stages.")
    p.add_argument("--model", nargs="+", default=None,
                   help="run directories or HF checkpoint folders (default: data/models/stories260K, then each "
                        "of runs/demo/stage1 and runs/demo/stage2 that exists, plus the TF-IDF row)")
    p.add_argument("--tasks", nargs="+", default=["STSBenchmark", "SciFact"],
                   help=f"bundled task names ({', '.join(BUNDLED_TASKS)}), STS files or BEIR folders")
    p.add_argument("--output", default="results", help="folder for <model>/<revision>/<task>.json")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    p.add_argument("--max-length", type=int, default=512, help="tokens per text, BOS and prompt included")
    p.add_argument("--similarity", choices=["cosine", "dot"], default="cosine", help="retrieval scoring")
    p.add_argument("--attention", choices=["bidirectional", "causal"], default=None,
                   help="default: the run's own, else bidirectional")
    p.add_argument("--pooling", choices=["mean", "last"], default=None, help="default: the run's own, else mean")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"], default="auto",
                   help="weights dtype; auto: bfloat16 on CUDA; on CPU bfloat16 for runs trained with "
                        "--precision bf16 (on a CPU with bf16 units), else float32 (auto_dtype)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model's layers (Embedder.compile): pays off on large corpora only, "
                        "the compile takes tens of seconds on CPU (bench/bench_compile.py)")
    p.add_argument("--baseline", choices=["tfidf", "bm25"], nargs="+", default=[],
                   help="add reference rows: tfidf (bag of words; always there when --model is not given), "
                        "bm25 (retrieval tasks only)")
    p.add_argument("--ignore-identical-ids", action="store_true",
                   help="drop doc id == query id from rankings (MTEB does for ArguAna, Quora, FiQA2018...)")
    return p.parse_args(argv)


def evaluate_model(encoder, name, revision, meta, args):
    """Every task for one model: score, write its result file, return {task name: scores}."""
    results = {}
    for task in args.tasks:
        task_name = resolve_task(task)[0]
        t0 = time.time()
        try:
            scores = evaluate_task(encoder, task, args.similarity, args.batch_size, args.ignore_identical_ids)
        except NonFiniteError as e:  # the encoder's NaN: name the model it came from
            raise NonFiniteError(f"model {name}, task {task_name}: {e}") from None
        elapsed = time.time() - t0
        out = write_mteb_result(task_name, scores, args.output, name, revision, evaluation_time=round(elapsed, 2),
                                dataset_revision=dataset_revision(task), meta=meta)
        log(f"{name} {task_name}: main score {scores['main_score']:.4f} in {elapsed:.1f}s -> {out}")
        results[task_name] = scores
    return results


def main(argv=None):
    args = parse_args(argv)
    import model  # for its error type: a bad checkpoint is a user mistake, not a crash

    try:
        if args.batch_size < 1 or args.max_length < 1:
            raise EvalError(f"--batch-size {args.batch_size} / --max-length {args.max_length}: must be positive")
        tasks = [resolve_task(t) for t in args.tasks]  # a bad task name fails before any model loads
        paths = args.model or [BUNDLED_MODEL] + [Path(r) for r in DEMO_RUNS if Path(r).is_dir()]
        rows = []
        for path in paths:
            encoder, name, revision, meta = load_encoder(path, args)
            rows.append((name, revision, evaluate_model(encoder, name, revision, meta, args)))
        if "tfidf" in args.baseline or not args.model:
            rows.append(("tfidf (wiki idf)", "-", {resolve_task(t)[0]: evaluate_tfidf(t, ignore_identical_ids=
                                                                                     args.ignore_identical_ids)
                                                   for t in args.tasks}))
        if "bm25" in args.baseline:  # STS tasks have no BM25 score: their cell stays empty
            rows.append(("bm25", "-", {resolve_task(t)[0]: evaluate_bm25(t, ignore_identical_ids=args.ignore_identical_ids)
                                       for t in args.tasks if resolve_task(t)[1] == "retrieval"}))
    except (EvalError, model.ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print_table(rows, tasks)


if __name__ == "__main__":
    main()
