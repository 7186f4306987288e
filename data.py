"""Training texts and the order they are seen in: reading a corpus file (.txt or .jsonl, the
rules in README.md "Data"), the batches of each epoch (shuffled, optionally grouped by length,
the same after a resume and on every rank: BatchPlan) and the row chunks a batch is computed in
when it would hold more than --max-batch-tokens positions.

Not included: streaming corpora larger than memory, tokenization (targets.py, tokenizer.py).
"""

import json
from pathlib import Path

import torch

import evaluate as E  # the line rules of text files (it needs only numpy at import)
from runs import TrainError


def read_texts(path) -> list[str]:
    """Texts from a .txt file (one a line, as written) or .jsonl (a 'text' string a line). Lines
    follow evaluate.text_lines: a BOM is dropped, CRLF is a line end, a lone "\\r" or U+2028 is
    text, a NUL byte or bytes that are not UTF-8 are an error naming the line, and a line of any
    length is one text (tokenization truncates it to --max-length). JSON escapes, "\\u0000"
    included, are the writer's choice and kept. Blank (whitespace-only) lines are counted and
    reported, never silently dropped."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: file not found")
    texts, blank = [], 0
    for n, line in E.text_lines(path, TrainError):  # one set of line rules for every reader
        if not line.strip():
            blank += 1
            continue
        if path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainError(f"{path}:{n}: invalid JSON: {e.msg}") from None
            except (ValueError, RecursionError) as e:  # json's int-size limit, nesting too deep
                raise TrainError(f"{path}:{n}: invalid JSON: {e}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise TrainError(f"{path}:{n}: expected an object with a string field 'text'")
            texts.append(obj["text"])
        else:
            texts.append(line)
    if blank:
        print(f"{path}: {blank} blank line(s) ignored")
    if not texts:
        raise TrainError(f"{path}: no texts")
    return texts


def epoch_order(n, epoch, seed):
    """The shuffled order of epoch `epoch`: a pure function of (n, epoch, seed), so a resumed run
    sees exactly the batches the uninterrupted run would have seen."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def epoch_batches(n, epoch, global_batch, seed, lengths=None, group=50):
    """The global batches of one epoch (lists of text indices), a pure function of the arguments.

    lengths None: the shuffled order cut into batches. Otherwise length-grouped (as
    transformers' LengthGroupedSampler): the shuffled order is cut into mega-batches of `group`
    batches, each sorted by token count and cut into batches, and the batch order is shuffled;
    the batch with the most tokens goes first, so that running out of memory happens at step 1.
    Batches then hold texts of similar length: far less padding, the same texts per epoch.
    The incomplete batch at an epoch's end is dropped, so every rank has the same batch size."""
    order = epoch_order(n, epoch, seed)[: n // global_batch * global_batch]
    if lengths is None:
        return [order[i: i + global_batch] for i in range(0, len(order), global_batch)]
    batches, mega = [], global_batch * group
    for start in range(0, len(order), mega):
        chunk = sorted(order[start: start + mega], key=lambda i: -lengths[i])  # stable: ties stay shuffled
        batches += [chunk[i: i + global_batch] for i in range(0, len(chunk), global_batch)]
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)
    batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]) * len(batches[b]))
    batches[0], batches[longest] = batches[longest], batches[0]
    return batches


class BatchPlan:
    """Global micro-batch number `position` (counted from the start of training, across epochs)
    -> this rank's text indices. The same for every rank and after a resume; each rank takes
    every world-th text of the global batch (with grouping, ranks see similar lengths)."""

    def __init__(self, n, global_batch, seed, lengths=None, group=50):
        self.n, self.global_batch, self.seed, self.lengths, self.group = n, global_batch, seed, lengths, group
        self.per_epoch = n // global_batch
        self._epoch, self._batches = None, None

    def __call__(self, position, rank=0, world=1):
        epoch, i = divmod(position, self.per_epoch)
        if epoch != self._epoch:  # one epoch's batches at a time
            self._epoch = epoch
            self._batches = epoch_batches(self.n, epoch, self.global_batch, self.seed, self.lengths, self.group)
        return self._batches[i][rank::world]


def row_chunks(lengths, max_tokens) -> list[list[int]]:
    """lengths of a micro-batch's texts (tokens) -> lists of row numbers, in order, each padded to its
    longest text holding at most max_tokens positions (one row at least); max_tokens 0: one chunk."""
    chunks, top = [[]], 0
    for j, n in enumerate(lengths):
        if chunks[-1] and max_tokens and (len(chunks[-1]) + 1) * max(top, n) > max_tokens:
            chunks.append([])
            top = 0
        chunks[-1].append(j)
        top = max(top, n)
    return chunks
