"""Loading a sharded ~1 GB checkpoint: time and peak resident memory, ours vs transformers.

    python bench/bench_load.py [--threads 1] [--repeats 3] [--layers 16] [--shard-size 300MB]

Writes a random Llama (D=1024, 16 layers, V=32000: ~1.0 GB in fp32) with transformers'
save_pretrained(max_shard_size=...) into a temporary folder, then loads it in a fresh subprocess
per try: `model.load` (ours), AutoModelForCausalLM.from_pretrained (transformers), and, to show what
the meta-device build avoids, a naive load (a materialised model, then safetensors' load_file of
each shard and load_state_dict: a copy), fp32 on CPU.
Each child measures VmRSS after its imports (torch, safetensors, and transformers' Llama modeling
code for its side), resets the peak (VmHWM, via /proc/self/clear_refs), loads, reads every weight
once (both loaders may leave tensors memory-mapped and unread until a forward pass touches them),
and reports RSS right after loading, the peak above the baseline, and the RSS at the end. Sides
alternate; medians of the tries.
The target: peak above the baseline <= 1.3x the checkpoint's size (one copy of the
weights, no second one held while loading).

Dimensions: D hidden, V vocabulary.
Not included: GPU loading (device="cuda" reads each tensor straight to the GPU), bf16 casts.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402  (puts the repo root and tests/ on sys.path)
import files  # noqa: E402


def load_config(layers, dim=1024, ffn=2816, vocab=32000):
    return dict(C.BENCH_LLAMA, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=16, num_key_value_heads=8, vocab_size=vocab)


def write_checkpoint(path, layers, shard_size, **dims):
    import hf_reference
    C.quiet_transformers()
    return hf_reference.save_random_checkpoint(path, load_config(layers, **dims), max_shard_size=shard_size)


def checkpoint_bytes(path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def child(side, path):
    """In a fresh process: import, baseline, reset peak, load, report (JSON on stdout)."""
    import torch  # (already imported by common.py: not counted below)
    t_import = time.perf_counter()
    import safetensors.torch  # noqa: F401
    if side == "ours":
        import model as M
        load = lambda: M.load(path)[0]  # noqa: E731
    elif side == "naive":  # what model.load avoids: a materialised model, then a copy of the file's tensors
        import checkpoints
        import config
        import files
        import model as M
        from safetensors.torch import load_file

        def load():
            m = M.Transformer(M.args_from_config(files.read_json(Path(path) / "config.json")))
            for f in checkpoints.weight_files(path):
                m.load_state_dict({config.hf_to_ours(k): v for k, v in load_file(str(f)).items()}, strict=False)
            return m
    else:
        import transformers.models.llama.modeling_llama  # noqa: F401  (the code it will run)
        from transformers import AutoModelForCausalLM
        C.quiet_transformers()
        load = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # noqa: E731
    base = C.rss_bytes()
    reset = C.reset_peak()
    t0 = time.perf_counter()
    import_seconds = t0 - t_import
    m = load()
    seconds = time.perf_counter() - t0
    after_load = C.rss_bytes() - base
    # both sides may leave weights memory-mapped and unread; the first forward pass reads them all
    with torch.no_grad():
        for p in m.parameters():
            p.sum()
    n_params = sum(p.numel() for p in m.parameters())
    print(json.dumps(dict(seconds=seconds, with_imports=seconds + import_seconds, after_load=after_load,
                          peak=C.peak_rss_bytes() - base,
                          after=C.rss_bytes() - base, reset=reset, params=n_params)))


def measure(side, path, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    res = subprocess.run([sys.executable, __file__, "--child", side, "--ckpt", str(path)], capture_output=True,
                         text=True, env=env, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"{side} load child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def compare(path, repeats, threads):
    """-> {side: [result per try]}, sides alternating."""
    tries = {"ours": [], "theirs": [], "naive": []}
    for i in range(repeats):
        for side in ("ours", "theirs", "naive") if i % 2 == 0 else ("naive", "theirs", "ours"):
            tries[side].append(measure(side, path, threads))
    return tries


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="OMP threads of each loading process")
    p.add_argument("--repeats", type=int, default=3, help="loads per side (fresh process each)")
    p.add_argument("--layers", type=int, default=16, help="decoder layers (16: ~1.0 GB in fp32)")
    p.add_argument("--shard-size", default="300MB", help="save_pretrained max_shard_size")
    p.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    p.add_argument("--child", choices=["ours", "theirs", "naive"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / "ckpt", args.layers, args.shard_size)
        size = checkpoint_bytes(path)
        shards = len(list(path.glob("*.safetensors")))
        tries = compare(path, args.repeats, args.threads)
    rows = []
    med = {}
    for side, name in (("ours", "ours (model.load)"), ("theirs", "transformers from_pretrained"),
                       ("naive", "naive: nn.Module on CPU + load_file + load_state_dict")):
        t = tries[side]
        med[side] = {k: C.median([r[k] for r in t]) for k in ("seconds", "with_imports", "after_load", "peak", "after")}
        rows.append([name, f"{med[side]['seconds']:.2f}", f"{med[side]['with_imports']:.2f}",
                     f"{med[side]['after_load'] / 2**20:.0f}",
                     f"{med[side]['peak'] / 2**20:.0f}", f"{med[side]['peak'] / size:.2f}",
                     f"{med[side]['after'] / 2**20:.0f}"])
    rows.append(["ratio ours/transformers", f"{med['ours']['seconds'] / med['theirs']['seconds']:.2f}",
                 f"{med['ours']['with_imports'] / med['theirs']['with_imports']:.2f}", "",
                 f"{med['ours']['peak'] / med['theirs']['peak']:.2f}", "", ""])
    ok = med["ours"]["peak"] <= 1.3 * size
    notes = [f"Checkpoint: random Llama, {tries['ours'][0]['params'] / 1e6:.0f}M parameters, fp32, "
             f"{size / 2**20:.0f} MiB in {shards} shards (max_shard_size {args.shard_size}), in the page cache. "
             f"Medians of {args.repeats} loads per side, each in a fresh process (OMP threads {args.threads}); "
             f"VmHWM reset: {tries['ours'][0]['reset']}.",
             "Load s: the load call alone. Imports + load: safetensors and model.py (ours) or transformers' "
             "Llama modeling code (theirs) plus the load; torch's own import is common to both and excluded. "
             "Both loaders leave the weights memory-mapped (file pages, counted in RSS once read), so reading "
             "every weight once brings each to ~1.0x the checkpoint; the naive load holds a copy of a shard "
             "beside the model.",
             f"Target: ours peak above baseline <= 1.3x checkpoint: {'met' if ok else 'NOT met'} "
             f"({med['ours']['peak'] / size:.2f}x)."]
    C.report("Loading a sharded checkpoint (CPU)", ["side", "load s", "imports + load s", "RSS after load MiB",
                                                    "peak (load + read all) MiB", "peak / checkpoint",
                                                    "RSS at end MiB"], rows, notes,
             write=not args.no_write)


if __name__ == "__main__":
    main()
