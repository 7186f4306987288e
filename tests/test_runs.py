"""Runs that survive preemption, damaged checkpoints, a full disk and a second writer: a stop
signal ends training after the current step with a checkpoint and the command that continues it
(exactly); checkpoints and final weights carry manifests that --resume and model.load check; a
failed write removes its temporary file and names the last good checkpoint (a real file-size
limit, not a mock); one flock per run directory, released by the kernel when its holder dies.

Subprocesses where signals and limits are involved; the tiny random Llama of test_train.py.
"""

import contextlib
import json
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate as E  # noqa: E402
import files  # noqa: E402
import model as M  # noqa: E402
import runs  # noqa: E402
import t2t  # noqa: E402
import targets as T  # noqa: E402
from test_train import ENV, WIKI, corpus, losses, parse, tiny_llama  # noqa: E402

STEPS = 24


def common_flags(model, data, steps=STEPS):
    return ["--model", model, "--data", data, "--batch-size", 8, "--max-steps", steps, "--lora-r", 4,
            "--lr", 1e-3, "--seed", 3]


def baseline(argv):
    """An uninterrupted run in this process, on one thread as the subprocesses are (ENV)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return t2t.train(parse(argv))
    finally:
        torch.set_num_threads(threads)


def assert_same_run(a, b, weights="adapter.safetensors", atol=1e-6):
    """The final weights within atol, the same steps in the metrics log, losses within atol."""
    wa, wb = load_file(str(Path(a) / weights)), load_file(str(Path(b) / weights))
    assert set(wa) == set(wb)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= atol
    steps = [json.loads(line)["step"] for line in (Path(b) / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(losses(a)) + 1))
    assert losses(b) == pytest.approx(losses(a), abs=atol)


@pytest.fixture
def launched():
    """The processes a test starts; any still running when it ends (a failed assertion) is killed."""
    procs = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start(launched, argv, log, env=ENV):
    """`t2t.py ARGV` in the background; stdout and stderr go to the file `log`."""
    with open(log, "w") as fh:
        launched.append(subprocess.Popen([sys.executable, str(ROOT / "t2t.py"), *map(str, argv)], stdout=fh,
                                         stderr=fh, cwd=ROOT, env=env))
    return launched[-1]


def wait_for(condition, procs, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        assert all(p.poll() is None for p in procs), "the run ended before it could be signalled"
        time.sleep(0.005)


def metric_lines(out):
    path = Path(out) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def continue_command(text):
    """The command line a stopped run printed after 'continue with:'."""
    return text.split("continue with:\n", 1)[1].splitlines()[0].strip()


def no_temporary_files(folder):
    return not [p for p in Path(folder).rglob("*") if ".tmp" in p.name]


class Crash(Exception):
    pass


def crash_at_step(monkeypatch, n):
    """Make the n-th loss computation raise: a run that dies during step n (grad-accum 1)."""
    real, calls = T.kl_loss, {"n": 0}

    def loss(logits, target):
        calls["n"] += 1
        if calls["n"] == n:
            raise Crash
        return real(logits, target)
    monkeypatch.setattr(T, "kl_loss", loss)


def run_and_crash(tmp_path, monkeypatch, common, step):
    """The uninterrupted run (the reference) and the same run dying during `step` -> (full, crashed)."""
    full = baseline(common + ["--out", tmp_path / "full"])
    out = tmp_path / "run"
    crash_at_step(monkeypatch, step)
    with pytest.raises(Crash):
        t2t.train(parse(common + ["--out", out]))
    monkeypatch.undo()
    return full, out


def damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # altered: one byte of the last tensor's data, same size, still a readable file
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))


@contextlib.contextmanager
def file_size_limit(nbytes):
    """RLIMIT_FSIZE in this process, SIGXFSZ ignored: a write past nbytes fails with EFBIG."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)


def limited_to(nbytes):
    """preexec_fn for a subprocess whose files cannot grow past nbytes (a disk that fills up)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


# -----------------------------------------------------------------------------
# 1. Preemption


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resume_is_exact(tmp_path, launched):
    model, data = tiny_llama(tmp_path), corpus(tmp_path, 128)
    common = common_flags(model, data)
    full = baseline(common + ["--out", tmp_path / "full"])
    out = tmp_path / "stopped"
    proc = start(launched, ["train", *common, "--out", out], tmp_path / "log")
    wait_for(lambda: metric_lines(out) >= 3, [proc])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143  # 128 + SIGTERM
    log = (tmp_path / "log").read_text()
    assert "Traceback" not in log
    step = metric_lines(out)  # the step in flight finished and was logged; none after it
    assert 3 <= step < STEPS and f"stopped by SIGTERM after step {step} of {STEPS}" in log
    files.check_manifest(out / "checkpoints" / f"step-{step}", ["adapter.safetensors", "state.pt"])
    assert not (out / "adapter.safetensors").exists() and no_temporary_files(out)
    # the command it printed continues the run, exactly
    command = continue_command(log)
    assert command.endswith(" --resume") and str(out) in command
    resumed = subprocess.run(shlex.split(command), capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'checkpoints' / f'step-{step}'}" in resumed.stdout
    assert_same_run(full, out)


HOOKED_CLI = """
import os, signal, sys
sys.path.insert(0, sys.argv.pop(1))
import runs, t2t, targets
calls, real_loss, real_save = [0], targets.kl_loss, runs.torch_save

def loss(*a):  # SIGTERM during step 5
    calls[0] += 1
    if calls[0] == 5:
        os.kill(os.getpid(), signal.SIGTERM)
    return real_loss(*a)

def save(obj, path):  # a second signal while the checkpoint's state.pt is being written
    os.kill(os.getpid(), signal.SIGINT)
    real_save(obj, path)

targets.kl_loss, runs.torch_save = loss, save
t2t.cli()
"""


def test_a_second_signal_while_saving_leaves_an_intact_checkpoint(tmp_path):
    model, data = tiny_llama(tmp_path), corpus(tmp_path, 64)
    common = common_flags(model, data, steps=12)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", HOOKED_CLI, str(ROOT), "train", *map(str, common), "--out", str(out)],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert r.returncode == 143, r.stderr  # the first signal's status
    assert "SIGINT: already stopping" in r.stderr and "stopped by SIGTERM after step 5 of 12" in r.stderr
    assert "Traceback" not in r.stderr
    assert [d.name for d in runs.checkpoint_dirs(out)] == ["step-5"] and no_temporary_files(out)
    files.check_manifest(out / "checkpoints" / "step-5", ["adapter.safetensors", "state.pt"])
    resumed = t2t.train(parse(common + ["--out", out, "--resume"]))
    assert_same_run(baseline(common + ["--out", tmp_path / "full"]), resumed)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(launched, argv, tmp_path, name):
    """Two ranks with torchrun's environment (env:// rendezvous, gloo), without torchrun itself."""
    port, procs = free_port(), []
    for rank in (0, 1):
        env = dict(ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(start(launched, ["train", *argv], tmp_path / f"{name}{rank}.log", env))
    return procs


def test_ranks_stop_after_the_same_step(tmp_path, launched):
    data = corpus(tmp_path, 64)
    common = ["--data", data, "--max-steps", 12, "--lora-r", 0, "--lr", 1e-3, "--precision", "fp32", "--seed", 1]
    one = baseline(common + ["--batch-size", 8, "--out", tmp_path / "one"])
    out = tmp_path / "two"
    ranks = start_ranks(launched, common + ["--batch-size", 4, "--out", out], tmp_path, "stop")
    wait_for(lambda: metric_lines(out) >= 3, ranks)
    ranks[1].send_signal(signal.SIGUSR1)  # rank 1 only: rank 0 learns of it from the all-reduce
    assert [p.wait(timeout=120) for p in ranks] == [138, 138]  # 128 + SIGUSR1
    log0, log1 = (tmp_path / "stop0.log").read_text(), (tmp_path / "stop1.log").read_text()
    step = metric_lines(out)
    assert f"stopped by SIGUSR1 after step {step} of 12" in log0 and "stopped by" not in log1
    assert "torchrun --nproc_per_node 2" in continue_command(log0)
    assert [d.name for d in runs.checkpoint_dirs(out)] == [f"step-{step}"]
    files.check_manifest(out / "checkpoints" / f"step-{step}", ["model.safetensors", "state.pt"])
    resumed = start_ranks(launched, common + ["--batch-size", 4, "--out", out, "--resume"], tmp_path, "resume")
    assert [p.wait(timeout=300) for p in resumed] == [0, 0], (tmp_path / "resume0.log").read_text()[-2000:]
    # as test_gloo_two_processes_match_one_process: all-reduce order moves weights by rounding only
    assert losses(out) == pytest.approx(losses(one), abs=1e-5)
    a, b = load_file(str(one / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4


def test_a_signal_during_a_long_pass_leaves_no_file(tmp_path, launched):
    s1 = t2t.train(parse(["--data", corpus(tmp_path, 16), "--out", tmp_path / "s1", "--batch-size", 8,
                          "--max-steps", 1, "--lora-r", 4]))
    # `t2t.py targets`: the background pass, then the targets; stopped in the first
    out = tmp_path / "targets.safetensors"
    proc = start(launched, ["targets", "--stage", "2", "--model", s1, "--data", WIKI, "--batch-size", 1, "--out", out],
                       tmp_path / "targets.log")
    wait_for(lambda: "targets: " in (tmp_path / "targets.log").read_text(), [proc])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    log = (tmp_path / "targets.log").read_text()
    assert "stopped by SIGTERM: nothing was left half-written" in log and "Traceback" not in log
    assert not out.exists() and no_temporary_files(tmp_path)
    # stage 2's background pass in `train`: no background.safetensors, and the run can be continued
    run = tmp_path / "s2"
    proc = start(launched, ["train", "--stage", "2", "--init", s1, "--data", WIKI, "--batch-size", 1, "--max-steps", 2,
                        "--lora-r", 4, "--out", run], tmp_path / "train.log")
    wait_for(lambda: "background: " in (tmp_path / "train.log").read_text(), [proc])
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130  # 128 + SIGINT
    log = (tmp_path / "train.log").read_text()
    assert "stopped by SIGINT before training; continue with:" in log and "Traceback" not in log
    assert continue_command(log).endswith("--resume")
    assert not (run / "background.safetensors").exists() and no_temporary_files(run)


def test_write_atomic_leaves_nothing_when_stopped_mid_write(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"the old file")

    def stopped(tmp):
        tmp.write_bytes(b"half a fi")
        raise t2t.Stopped(signal.SIGTERM)

    with pytest.raises(t2t.Stopped):
        files.write_atomic(path, stopped)
    assert path.read_bytes() == b"the old file" and os.listdir(tmp_path) == ["weights.safetensors"]


# -----------------------------------------------------------------------------
# 2. Checkpoint integrity


def test_resume_skips_damaged_checkpoints_with_one_warning_each(tmp_path, monkeypatch, capsys):
    model, data = tiny_llama(tmp_path), corpus(tmp_path, 64)
    common = common_flags(model, data, steps=12) + ["--save-every", 2, "--keep-last", 3]
    full, out = run_and_crash(tmp_path, monkeypatch, common, 8)
    ckpts = out / "checkpoints"
    assert [d.name for d in runs.list_checkpoints(out)] == ["step-2", "step-4", "step-6"]
    damage(ckpts / "step-6" / "adapter.safetensors", "truncated")
    damage(ckpts / "step-4" / "state.pt", "altered")
    capsys.readouterr()
    resumed = t2t.train(parse(common + ["--out", out, "--resume"]))
    printed = capsys.readouterr().out
    warnings = [line for line in printed.splitlines() if line.startswith("WARNING:")]
    assert len(warnings) == 2
    assert str(ckpts / "step-6" / "adapter.safetensors") in warnings[0] and "truncated" in warnings[0]
    assert str(ckpts / "step-4" / "state.pt") in warnings[1] and "altered" in warnings[1]
    assert f"resumed from {ckpts / 'step-2'} (step 2)" in printed
    assert_same_run(full, resumed)


@pytest.mark.parametrize("how", ["no manifest", "a file missing", "altered"])
def test_a_checkpoint_is_intact_only_as_its_manifest_says(tmp_path, how, capsys):
    model, data = tiny_llama(tmp_path), corpus(tmp_path, 32)
    out = t2t.train(parse(common_flags(model, data, steps=4) + ["--save-every", 2, "--out", tmp_path / "run"]))
    step2 = out / "checkpoints" / "step-2"
    assert runs.newest_intact_checkpoint(out, True, print) == step2
    broken = {"no manifest": step2 / "manifest.json", "a file missing": step2 / "state.pt",
              "altered": step2 / "adapter.safetensors"}[how]
    if how == "altered":
        damage(broken, "altered")
    else:
        broken.unlink()
    capsys.readouterr()
    with pytest.raises(t2t.TrainError, match="none of the 1 checkpoint"):
        runs.newest_intact_checkpoint(out, True, print)
    warning = capsys.readouterr().out.strip()
    assert warning.startswith("WARNING:") and str(broken) in warning and len(warning.splitlines()) == 1


def test_keep_last_never_deletes_the_last_intact_checkpoint(tmp_path, monkeypatch):
    model, data = tiny_llama(tmp_path), corpus(tmp_path, 64)
    common = common_flags(model, data, steps=12) + ["--save-every", 3]
    full, out = run_and_crash(tmp_path, monkeypatch, common, 7)
    damage(out / "checkpoints" / "step-6" / "adapter.safetensors", "altered")
    # resumed from step 3 with --keep-last 1 and another --save-every, it dies again after step 4:
    # step-4 is then the only intact checkpoint, and the damaged step-6 has the higher number
    crash_at_step(monkeypatch, 2)
    with pytest.raises(Crash):
        t2t.train(parse(common + ["--out", out, "--resume", "--save-every", 1, "--keep-last", 1]))
    monkeypatch.undo()
    assert [d.name for d in runs.list_checkpoints(out)] == ["step-4", "step-6"]
    resumed = t2t.train(parse(common + ["--out", out, "--resume"]))
    assert_same_run(full, resumed)


def test_final_weights_are_checked_when_a_run_is_loaded(tmp_path, capsys):
    data = corpus(tmp_path, 16)
    run = t2t.train(parse(["--data", data, "--out", tmp_path / "run", "--batch-size", 8, "--max-steps", 2,
                           "--lora-r", 4]))
    assert set(json.loads((run / "manifest.json").read_text())["files"]) == {"adapter.safetensors"}
    M.load(run)
    adapter = run / "adapter.safetensors"
    good = adapter.read_bytes()
    for how in ("altered", "truncated"):
        damage(adapter, how)
        with pytest.raises(M.ModelError, match=f"{adapter}: .*{how}"):
            M.load(run)
        with pytest.raises(M.ModelError, match=str(adapter)):
            M.Embedder.from_run(run)
        with pytest.raises(M.ModelError, match=str(adapter)):
            t2t.main(["export", "--model", str(run), "--out", str(tmp_path / f"hf-{how}")])
        with pytest.raises(SystemExit) as exit_:
            E.main(["--model", str(run), "--tasks", "STSBenchmark", "--output", str(tmp_path / "results")])
        assert exit_.value.code == 2 and str(adapter) in capsys.readouterr().err
        adapter.write_bytes(good)
    # a run written before manifests loads, after one WARNING line
    (run / "manifest.json").unlink()
    capsys.readouterr()
    M.load(run)
    assert capsys.readouterr().err.count("WARNING:") == 1


def test_stage2_background_is_in_the_manifest_and_recomputed_when_damaged(tmp_path, capsys):
    data = corpus(tmp_path, 16)
    s1 = t2t.train(parse(["--data", data, "--out", tmp_path / "s1", "--batch-size", 8, "--max-steps", 1,
                          "--lora-r", 0, "--precision", "fp32"]))
    argv = ["--stage", "2", "--init", s1, "--data", data, "--out", tmp_path / "s2", "--batch-size", 8, "--max-steps",
            1, "--lora-r", 0, "--precision", "fp32", "--tau", 0.1]
    s2 = t2t.train(parse(argv))
    files.check_manifest(s2, ["model.safetensors", "background.safetensors"])
    cache = s2 / "background.safetensors"
    good = cache.read_bytes()
    damage(cache, "altered")
    capsys.readouterr()
    t2t.train(parse(argv + ["--resume"]))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING:")]
    assert len(warnings) == 1 and str(cache) in warnings[0] and "computed again" in warnings[0]
    assert cache.read_bytes() == good
    files.check_manifest(s2, ["model.safetensors", "background.safetensors"])


def test_stage2_background_from_another_run_is_reused_and_checked(tmp_path, capsys):
    """--background-from: a tau sweep computes the background once; the reused logits equal the
    computed ones, and a run whose background would differ (another sample, another teacher) is
    refused before its run directory is created."""
    data = corpus(tmp_path, 16)
    s1 = t2t.train(parse(["--data", data, "--out", tmp_path / "s1", "--batch-size", 8, "--max-steps", 1,
                          "--lora-r", 0, "--precision", "fp32"]))
    common = ["--stage", "2", "--init", s1, "--data", data, "--batch-size", 8, "--max-steps", 1, "--lora-r", 0,
              "--precision", "fp32"]
    a = t2t.train(parse(common + ["--out", tmp_path / "a", "--tau", 0.1]))
    capsys.readouterr()
    b = t2t.train(parse(common + ["--out", tmp_path / "b", "--tau", 0.01, "--background-from", a]))
    out = capsys.readouterr().out
    assert f"background read from {a / 'background.safetensors'}" in out and "background over" not in out
    assert (b / "background.safetensors").read_bytes() == (a / "background.safetensors").read_bytes()
    files.check_manifest(b, ["model.safetensors", "background.safetensors"])
    s1b = t2t.train(parse(["--data", data, "--out", tmp_path / "s1b", "--batch-size", 8, "--max-steps", 2,
                           "--lora-r", 0, "--precision", "fp32"]))
    for flags, key in [(["--background-samples", 8], "background_samples"), (["--init", s1b], "init"),
                       (["--max-length", 64], "max_length"), (["--pooling", "last"], "embedding")]:
        argv = common + ["--out", tmp_path / f"c_{key}", "--background-from", a] + flags
        with pytest.raises(t2t.TrainError, match=f"--background-from {a}: its '{key}' is"):
            t2t.train(parse(argv))
        assert not (tmp_path / f"c_{key}").exists()
    with pytest.raises(t2t.TrainError, match="not a stage-2 run"):
        t2t.train(parse(common + ["--out", tmp_path / "d", "--background-from", s1]))
    damage(a / "background.safetensors", "altered")
    with pytest.raises(t2t.TrainError, match=f"--background-from {a}: .*background.safetensors"):
        t2t.train(parse(common + ["--out", tmp_path / "e", "--background-from", a]))


# -----------------------------------------------------------------------------
# 3. A full disk


def test_a_full_disk_during_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    model, data = tiny_llama(tmp_path), corpus(tmp_path, 64)
    common = common_flags(model, data, steps=12) + ["--save-every", 3]
    full, out = run_and_crash(tmp_path, monkeypatch, common, 8)
    step6 = out / "checkpoints" / "step-6"
    adapter, state = (step6 / "adapter.safetensors").stat().st_size, (step6 / "state.pt").stat().st_size
    limit = (adapter + state) // 2  # the checkpoint's weights fit, its state.pt stops partway
    assert adapter < limit < state and (out / "metrics.jsonl").stat().st_size < limit
    r = subprocess.run([sys.executable, str(ROOT / "t2t.py"), "train", *map(str, common), "--out", str(out),
                        "--resume"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300,
                       preexec_fn=limited_to(limit))
    assert r.returncode == 2, r.stderr
    error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in r.stderr
    assert str(out / "checkpoints" / ".tmp-step-9" / "state.pt") in error[0] and "File too large [EFBIG]" in error[0]
    assert f"last good checkpoint: {step6}" in error[0]
    assert [d.name for d in runs.checkpoint_dirs(out)] == ["step-3", "step-6"] and no_temporary_files(out)
    files.check_manifest(step6, ["adapter.safetensors", "state.pt"])
    resumed = t2t.train(parse(common + ["--out", out, "--resume"]))  # the disk has room again
    assert_same_run(full, resumed)


def test_a_full_disk_leaves_no_temporary_file_in_any_writer(tmp_path):
    path = tmp_path / "old.json"
    path.write_text("{}")
    with file_size_limit(4), pytest.raises(files.WriteError, match=f"{path}: cannot be written .*EFBIG"):
        files.write_atomic(path, lambda tmp: tmp.write_text("a longer text"))
    assert path.read_text() == "{}"
    ids, w = torch.tensor([[1, 2]], dtype=torch.int32), torch.tensor([[0.5, 0.5]])
    with file_size_limit(64), pytest.raises(files.WriteError, match="targets.safetensors: cannot be written"):
        T.save_targets(tmp_path / "targets.safetensors", ids, w, {"kind": "data-driven"})
    scores = {"main_score": 0.5, "cosine_spearman": 0.5}
    with file_size_limit(64), pytest.raises(files.WriteError, match="STSBenchmark.json: cannot be written"):
        E.write_mteb_result("STSBenchmark", scores, tmp_path / "results", "local/x", "abc")
    run = t2t.train(parse(["--data", corpus(tmp_path, 16), "--out", tmp_path / "run", "--batch-size", 8,
                           "--max-steps", 1, "--lora-r", 4]))
    with file_size_limit(4096), pytest.raises(files.WriteError, match="model.safetensors: cannot be written"):
        t2t.main(["export", "--model", str(run), "--out", str(tmp_path / "hf")])
    assert path.read_text() == "{}" and no_temporary_files(tmp_path)
    assert not (tmp_path / "targets.safetensors").exists() and not (tmp_path / "hf" / "model.safetensors").exists()


# -----------------------------------------------------------------------------
# 4. One writer per run


def test_a_second_writer_fails_at_once_and_a_killed_holder_never_blocks(tmp_path, launched):
    model, data = tiny_llama(tmp_path), corpus(tmp_path, 64)
    common = common_flags(model, data, steps=100) + ["--save-every", 10]
    out = tmp_path / "run"
    holder = start(launched, ["train", *common, "--out", out], tmp_path / "log")
    wait_for(lambda: (out / "checkpoints" / "step-10").is_dir(), [holder])
    t0 = time.time()
    with pytest.raises(t2t.TrainError, match=f"another process is writing to this run \\(pid {holder.pid},"):
        t2t.train(parse(common + ["--out", out, "--resume"]))
    assert time.time() - t0 < 5  # at once: before any model is loaded
    with pytest.raises(t2t.TrainError, match="not empty"):
        t2t.train(parse(common + ["--out", out]))
    assert holder.poll() is None, "the holder ended before the second writer tried"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (out / "train.lock").read_text().strip() == str(holder.pid)  # left behind, and no obstacle
    t2t.train(parse(common + ["--out", out, "--resume"]))
    assert json.loads((out / "meta.json").read_text())["finished"]
