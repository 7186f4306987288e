"""Build data/scifact_dev/: a retrieval dev set from SciFact's *train* queries, for choosing
settings without touching SciFact's test queries (data/scifact/qrels/test.tsv).

100 train queries drawn with a fixed seed, every document judged relevant to them, and documents
drawn at random from the rest of the corpus up to 400 in all (no test-relevant document is
excluded or favoured: the draw ignores test qrels). Scored at max length 128 it takes about a
minute on one CPU core for SmolLM2-135M, so it can run at every dev evaluation of a training run.
The folder is a BEIR folder whose one split is `dev` (qrels/dev.tsv).

    python bench/make_retrieval_dev.py    # rewrites data/scifact_dev/ (deterministic)
"""
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC, OUT = ROOT / "data" / "scifact", ROOT / "data" / "scifact_dev"
N_QUERIES, N_DOCS, SEED = 100, 400, 0


def main():
    qrels = {}
    for line in (SRC / "qrels" / "train.tsv").read_text().splitlines()[1:]:
        q, d, s = line.split("\t")
        qrels.setdefault(q, {})[d] = int(s)
    rng = random.Random(SEED)
    queries = sorted(rng.sample(sorted(qrels, key=int), N_QUERIES), key=int)
    relevant = sorted({d for q in queries for d in qrels[q]}, key=int)
    corpus = [json.loads(line) for line in (SRC / "corpus.jsonl").open(encoding="utf-8")]
    others = [doc["_id"] for doc in corpus if doc["_id"] not in set(relevant)]
    keep = set(relevant) | set(rng.sample(others, N_DOCS - len(relevant)))
    (OUT / "qrels").mkdir(parents=True, exist_ok=True)
    with (OUT / "corpus.jsonl").open("w", encoding="utf-8") as f:
        for doc in corpus:  # corpus order kept
            if doc["_id"] in keep:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    wanted = set(queries)
    with (OUT / "queries.jsonl").open("w", encoding="utf-8") as f:
        for line in (SRC / "queries.jsonl").open(encoding="utf-8"):
            if json.loads(line)["_id"] in wanted:
                f.write(line)
    with (OUT / "qrels" / "dev.tsv").open("w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q in queries:
            for d, s in sorted(qrels[q].items(), key=lambda x: int(x[0])):
                f.write(f"{q}\t{d}\t{s}\n")
    print(f"{OUT}: {len(queries)} queries, {len(relevant)} relevant documents, {len(keep)} documents")


if __name__ == "__main__":
    main()
