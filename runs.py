"""What makes a training run trustworthy: one writer per run directory, clean stops on a signal,
checkpoints that are complete or ignored, metrics that match the checkpoint resumed from, and
the same on every process of a torchrun.

Follows README.md, "Runs": a run directory is created and locked (RunLock) before anything is
written into it; a stop signal (StopSignals) ends the run after the current optimizer step,
with a checkpoint; each checkpoint (checkpoints/step-N/: trainable weights, state.pt with the
optimizer, schedule, scaler, RNG states and data position) is written in a temporary folder,
with a manifest written last, and renamed when complete; --resume takes the newest intact one
(newest_intact_checkpoint). Under torchrun each rank holds a share of every batch; gradients
are averaged once per optimizer step and every rank stops after the same step.

Not included: multi-node launch, elastic restarts, pipeline/tensor parallelism, FSDP.
"""

import ctypes
import fcntl
import json
import os
import random
import shlex
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from checkpoints import read_run_meta
from files import MANIFEST, WriteError, check_manifest, save_weights_atomic, write_atomic, write_cause, write_manifest
from model import ModelError, lora_state_dict

T2T = Path(__file__).resolve().parent / "t2t.py"  # the command a stopped run is continued with


class TrainError(Exception):
    """A user-facing problem: printed as one line, no traceback."""


class Stopped(BaseException):
    """A stop signal (STOP_SIGNALS) ended the command. The exit status is 128 + its number (SIGTERM
    143, SIGINT 130, SIGUSR1 138), as a shell reports a process the signal killed; distinct from
    success (0) and from an error (2). A BaseException, like KeyboardInterrupt: no `except
    Exception` swallows it."""

    def __init__(self, signum, detail=""):
        self.signum, self.detail, self.status = signum, detail, 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}" + (f" {detail}" if detail else ""))


# -----------------------------------------------------------------------------
# Preemption: schedulers send SIGTERM (Kubernetes, SLURM at the time limit; SLURM's --signal often
# USR1) and then, after a grace period, SIGKILL; Ctrl-C sends SIGINT.


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignals:
    """Catches STOP_SIGNALS inside `with StopSignals() as stops:` (the command line). Outside the
    training loop a signal raises Stopped at once: every file is written under a temporary name
    (files.write_atomic), so nothing half-written is left. Inside (`deferred`) it is only noted: the
    loop stops after the current optimizer step, having written a checkpoint. A second signal is
    noted, never acted on, so that a save in progress completes. Not entered: nothing is caught
    (a caller of train() that did not ask for it)."""

    def __init__(self):
        self.signum, self.deferred, self.saved = 0, False, {}

    def __enter__(self):
        for s in STOP_SIGNALS:
            self.saved[s] = signal.signal(s, self.handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.saved.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum:  # os.write, not print: a handler may run inside a print
            os.write(2, f"\n{name}: already stopping, finishing what is being written\n".encode())
            return
        self.signum = signum
        if not self.deferred:
            raise Stopped(signum)
        os.write(2, f"\n{name}: stopping after this step, with a checkpoint\n".encode())


def how_to_continue(args, argv) -> str:
    if (Path(args.out) / "meta.json").is_file():
        return f"continue with:\n  {resume_command(args, argv, int(os.environ.get('WORLD_SIZE', '1')))}"
    return "nothing was written: run the same command again"


def resume_command(args, argv, world) -> str:
    """The command line that continues this run: the same flags, plus --resume."""
    flags = [str(a) for a in (argv or flags_of(args)) if a != "--resume"]
    flags = flags[1:] if flags[:1] == ["train"] else flags
    # one node: torchrun's own flags for several nodes are the launcher's to repeat
    launcher = ["torchrun", "--nproc_per_node", os.environ.get("LOCAL_WORLD_SIZE", str(world))] if world > 1 \
        else [sys.executable]
    return shlex.join(launcher + [str(T2T), "train", *flags, "--resume"])


def flags_of(args) -> list:
    """Every flag of a parsed `train` command line, as argv (for train() called without argv)."""
    argv = []
    for key, value in vars(args).items():
        if value is not None and value is not False and key not in ("resume", "preset", "cmd"):
            argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return argv


# -----------------------------------------------------------------------------
# Distributed (torchrun): each rank trains on its share of every global batch; gradients of the
# trainable parameters are averaged once per optimizer step. (We average explicitly rather than
# wrap in DDP: the LM head is used outside forward(), and may be tied to the embedding.)


def setup_distributed(device_arg):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_arg)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainError(f"--device {device_arg}: CUDA is not available on this machine")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_reduce_(t, op=dist.ReduceOp.SUM):
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


def average_gradients(params, world):
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective, not one per tensor
    all_reduce_(flat).div_(world)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def from_rank0(obj):
    """Rank 0's value of a small Python object, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agreed_stop(stops, device, world) -> int:
    """The number of the stop signal any rank caught (0: none): one scalar all-reduce (MAX) per
    optimizer step, so that every rank stops after the same step."""
    if world == 1:
        return stops.signum
    return int(all_reduce_(torch.tensor([stops.signum], device=device), dist.ReduceOp.MAX).item())


# -----------------------------------------------------------------------------
# One writer per run directory: an flock on <run>/train.lock, which holds the writer's pid. The
# kernel releases it when the process ends, however it ends, so a killed run never blocks the next.


LOCK_FILE = "train.lock"


class RunLock:
    def __init__(self):
        self.fd = None

    def acquire(self, out: Path):
        if self.fd is not None:
            return
        path = out / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise TrainError(f"{path}: cannot be created ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise TrainError(f"{out}: another process is writing to this run (pid {holder}, which holds {path}); "
                             f"wait for it to end, or stop it") from None
        except OSError as e:  # a file system without locks
            os.close(fd)
            raise TrainError(f"{path}: cannot be locked ({e.strerror})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the file releases the flock
            self.fd = None


# Flags that may differ between a run and its --resume (they do not change the result); "cmd" is the
# subcommand, absent when train() is called from Python.
RESUMABLE = {"resume", "save_every", "keep_last", "log_every", "skip_nonfinite", "preset", "device", "eval_every",
             "eval_data", "cmd"}


def prepare_out(args, lock):
    """Check --out against --resume; a run to resume is locked at once (lock: RunLock)."""
    out = Path(args.out)
    if args.resume:
        if not (out / "meta.json").is_file():
            raise TrainError(f"--resume: {out} holds no run (no meta.json)")
        lock.acquire(out)
        old = read_run_meta(out).get("args", {})
        now = vars(args)
        diff = [k for k in now if k not in RESUMABLE and old.get(k) != now[k]]
        if diff:
            detail = ", ".join(f"--{k.replace('_', '-')} {old.get(k)!r} -> {now[k]!r}" for k in diff)
            raise TrainError(f"--resume: flags differ from the run in {out}: {detail}")
    else:
        check_out_empty(out)
    return out  # created once the model and data have loaded, so a bad flag leaves nothing behind


def check_out_empty(out: Path):
    """A new run's --out may exist, empty (a lock file left by a start that failed counts as empty)."""
    if out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise TrainError(f"--out {out} exists and is not empty (use --resume to continue it, or another --out)")


def create_out(out: Path, resume, lock):
    """Make the run directory and lock it; a new run checks again, holding the lock, that no other
    run has started in it meanwhile."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{out}: cannot be created ({write_cause(e)})") from None
    lock.acquire(out)
    if not resume:
        check_out_empty(out)


# -----------------------------------------------------------------------------
# Checkpoints (written to a temporary name, then renamed: a kill during a write never leaves
# something that looks complete)


class _RecordingWriter:
    """The file torch.save writes through, keeping the OSError of a failed write: torch's zip
    writer turns it into a RuntimeError that says only 'unexpected pos'."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data):
        try:
            return self.fh.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.fh.flush()


def torch_save(obj, path):
    """torch.save to `path`; a failed write raises its own OSError (disk full, file too large)."""
    with open(path, "wb") as fh:
        writer = _RecordingWriter(fh)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


def trainable_state(model, lora: bool) -> dict:
    if lora:
        return lora_state_dict(model)
    state = model.state_dict()
    if model.args.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def weights_name(lora):
    return "adapter.safetensors" if lora else "model.safetensors"


def checkpoint_step(d: Path) -> int:
    return int(d.name[5:])


def checkpoint_dirs(out: Path):
    """The checkpoints/step-N folders, oldest first (a temporary .tmp-step-N is not one)."""
    dirs = [d for d in (out / "checkpoints").glob("step-*") if d.is_dir() and d.name[5:].isdigit()]
    return sorted(dirs, key=checkpoint_step)


def list_checkpoints(out: Path):
    """The checkpoints that were written completely (their manifest is there), oldest first."""
    return [d for d in checkpoint_dirs(out) if (d / MANIFEST).is_file()]


def checkpoint_files(lora):
    return [weights_name(lora), "state.pt"]


def save_checkpoint(out: Path, step, model, lora, opt, sched, scaler, position, keep_last):
    """checkpoints/step-N: the trainable weights, state.pt (optimizer, schedule, scaler, RNG states,
    data position) and, last, their manifest, in a temporary folder renamed when complete. A failed
    write (a full disk) removes the temporary folder and raises WriteError; earlier checkpoints
    are untouched."""
    final = out / "checkpoints" / f"step-{step}"
    tmp = out / "checkpoints" / f".tmp-step-{step}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_weights_atomic(trainable_state(model, lora), tmp / weights_name(lora))
        write_atomic(tmp / "state.pt", lambda f: torch_save({
            "step": step, "position": position, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }, f))
        write_manifest(tmp, checkpoint_files(lora))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except OSError as e:  # the folder itself (mkdir, rename) on a full disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(f"{final}: cannot be written ({write_cause(e)})") from None
    except BaseException:  # a failed file write (WriteError): only the temporary folder was touched
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(out, keep_last, final)
    return final


def prune_checkpoints(out: Path, keep_last, newest: Path):
    """Delete all but the keep_last newest checkpoints up to `newest`, the one just written (the
    last intact one, never deleted). Those of later steps are left: a resumed run skipped them as
    damaged, and rewrites them when it gets there."""
    if keep_last <= 0:
        return
    older = [d for d in list_checkpoints(out) if checkpoint_step(d) <= checkpoint_step(newest)]
    for old in older[:-keep_last]:
        shutil.rmtree(old)


def newest_intact_checkpoint(out: Path, lora, log):
    """The newest checkpoint whose files match its manifest. Each newer one that does not
    (truncated, altered, incomplete) gets one WARNING line naming the file. None when there is no
    checkpoint; TrainError when there are some but none is intact."""
    dirs = checkpoint_dirs(out)
    for d in reversed(dirs):
        try:
            check_manifest(d, checkpoint_files(lora))
            return d
        except ModelError as e:
            log(f"WARNING: {e}; checkpoint {d.name} skipped")
    if dirs:
        raise TrainError(f"--resume: none of the {len(dirs)} checkpoint(s) in {out / 'checkpoints'} is intact "
                         "(each is named above); start a new run with another --out")
    return None


def restore_checkpoint(ckpt: Path, model, lora, opt, sched, scaler):
    """Put weights, optimizer, schedule, scaler and RNG states back; -> (step, data position)."""
    from safetensors.torch import load_file
    weights = load_file(str(ckpt / weights_name(lora)))
    model.load_state_dict(weights, strict=False)  # only the trainable tensors are saved
    state = torch.load(ckpt / "state.pt", weights_only=False)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"], state["position"]


def run_files(out, lora):
    """The final files of a run that its manifest covers."""
    return [weights_name(lora)] + (["background.safetensors"] if (out / "background.safetensors").is_file() else [])


# What a stage-2 background depends on: the teacher (init), the texts and how they are embedded.
BACKGROUND_KEYS = ("init", "data", "background_samples", "max_length", "precision", "embedding")


def background_source(run, meta) -> Path:
    """--background-from RUN: RUN's cached background, if RUN computed it under the same settings as
    this run (its meta.json), else an error that names the first setting that differs."""
    run = Path(run)
    other = read_run_meta(run)
    if other.get("stage") != 2:
        raise TrainError(f"--background-from {run}: not a stage-2 run (meta.json 'stage' is {other.get('stage')})")

    def settings(m):
        return dict(m["args"], init=m["init"], precision=m["precision"], embedding=m["embedding"],
                    data=str(Path(m["args"]["data"]).resolve()))
    mine, theirs = settings(meta), settings(other)
    for key in BACKGROUND_KEYS:
        if mine.get(key) != theirs.get(key):
            raise TrainError(f"--background-from {run}: its {key!r} is {theirs.get(key)!r}, this run's is "
                             f"{mine.get(key)!r}; the background would not be this teacher's")
    cache = run / "background.safetensors"
    try:
        check_manifest(run, [cache.name])
    except ModelError as e:
        raise TrainError(f"--background-from {run}: {e}") from None
    return cache


def background_intact(out, cache, log) -> bool:
    """Whether the stage-2 background cached in the run directory matches the run's manifest; if not,
    one WARNING line naming the file (it is then computed again)."""
    try:
        check_manifest(out, [cache.name])
        return True
    except ModelError as e:
        log(f"WARNING: {e}; the background is computed again")
        return False


# -----------------------------------------------------------------------------
# Metrics: one JSON object a line


def truncate_metrics(path: Path, step):
    """Keep the metric lines of steps up to `step` (a resumed run redoes the later ones); a last line
    cut short (no newline: a kill or a full disk mid-write) is dropped."""
    if not path.is_file():
        return
    lines = path.read_text().split("\n")[:-1]  # what follows the last newline is "" or unfinished
    kept = []
    for n, line in enumerate(lines, 1):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            raise TrainError(f"{path}:{n}: not a metrics line (a JSON object with 'step')") from None
    write_atomic(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


def append_metrics(mfile, metrics):
    try:
        mfile.write(json.dumps(metrics) + "\n")
        mfile.flush()
    except OSError as e:
        raise WriteError(f"{mfile.name}: cannot be written ({write_cause(e)})") from None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def mmap_large_allocations(threshold=128 * 1024) -> bool:
    """glibc only: allocations of `threshold` bytes or more are mmap'd, so a freed activation goes
    back to the OS at once. By default glibc raises this threshold to the largest block freed so far
    (up to 32 MiB), so a step's 1-25 MB activations come from the heap afterwards and the process
    keeps what they took: a SmolLM2 fp32 step held 4.5 GB of RSS for 2.7 GB of live tensors, 2.7 GB
    with this, at the same speed and bitwise the same loss (BENCHMARKS.md "Memory (CPU)"). Elsewhere
    (no mallopt: macOS, Windows) nothing is done -> whether it was set."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (an AttributeError outside glibc)
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
