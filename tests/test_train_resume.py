"""Kill and interrupt real `leantune train` processes; resumed runs must end bitwise equal to uninterrupted ones."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import leantune as lt
from leantune.training.config import build_config

ROOT = Path(__file__).resolve().parent.parent
STEPS = 24


def write_config(folder: Path, out_dir: Path) -> Path:
    data = folder / "train.jsonl"
    with open(data, "w") as handle:
        for i in range(18):  # 18 examples, batches of 2, 2 per step: 4.5 steps per epoch, epochs cross mid-step
            handle.write(json.dumps({"prompt": f"{i} squared is ", "completion": str(i * i)}) + "\n")
    config = {
        "model": "tiny-llama",
        # dropout draws random numbers every step: resuming must restore the generator exactly
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train": str(data), "eval": None},
        "max_length": 32, "batch_size": 2, "grad_accum": 2, "lr": 5e-3, "warmup": 3, "schedule": "cosine",
        "max_steps": STEPS, "save_every": 1, "keep_checkpoints": 2, "seed": 7, "threads": 1,
        "out_dir": str(out_dir), "progress": False,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def leantune(*args, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "leantune.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


def latest_step(out_dir: Path) -> int:
    pointer = out_dir / "checkpoints" / "latest"
    try:
        return int(pointer.read_text().strip().split("-")[1])
    except (OSError, IndexError, ValueError):
        return -1


# The child: `leantune train` that stops at named points of the run, in the order PAUSES lists
# them. At the i-th it creates paused-<i> in PAUSE_DIR and waits for go-<i>, so a test signals or
# kills it at a known moment instead of racing it. The pauses change nothing the run computes.
#   in-step:N          step N has begun
#   in-checkpoint:N    the checkpoint of step N is half written (its adapter, not yet its optimizer)
#   after-checkpoint:N the checkpoint of step N is complete
#   at-exit            the process is exiting (an atexit hook)
CHILD = r"""
import atexit, os, sys, time
from pathlib import Path

import leantune.training.checkpoint as checkpoint
from leantune.cli import main
from leantune.training.loop import Trainer

folder, pauses = Path(os.environ["PAUSE_DIR"]), os.environ["PAUSES"].split()


def pause(where):
    if where not in pauses:
        return
    index = pauses.index(where)
    (folder / f"paused-{index}").touch()
    while not (folder / f"go-{index}").exists():
        time.sleep(0.01)


step, save_checkpoint, save_tensors = Trainer._step, checkpoint.save_checkpoint, checkpoint.save_tensors


def pausing_step(self, state):
    pause(f"in-step:{state['step'] + 1}")
    return step(self, state)


def pausing_save_checkpoint(out_dir, model, optimizer, trainer_state, keep, saved_adapter=None, **kwargs):
    path = save_checkpoint(out_dir, model, optimizer, trainer_state, keep, saved_adapter, **kwargs)
    pause(f"after-checkpoint:{trainer_state['step']}")
    return path


def pausing_save_tensors(tensors, path, metadata=None):
    folder_name = Path(path).parent.name  # the temporary ".step-N.tmp-..." of a checkpoint being written
    if Path(path).name == "optimizer.safetensors" and folder_name.startswith(".step-"):
        pause("in-checkpoint:" + folder_name.split(".tmp-")[0].removeprefix(".step-"))
    return save_tensors(tensors, path, metadata)


Trainer._step = pausing_step
checkpoint.save_checkpoint = pausing_save_checkpoint
checkpoint.save_tensors = pausing_save_tensors
atexit.register(pause, "at-exit")
sys.exit(main(sys.argv[1:]))
"""
WAIT_S = 90  # bound on every wait for the child; a tiny run reaches any point in seconds
CTRL_C_ACK = "Ctrl-C: saving a checkpoint after this step (press again to stop at once)\n"
CTRL_C_AGAIN = "Ctrl-C again: stopping as soon as the checkpoint being written is complete"


class Child:
    """A `leantune train` process with pauses; its stderr goes to a file the test can read at any time."""

    def __init__(self, folder: Path, args: tuple, pauses: list[str]):
        self.pause_dir = folder / "pauses"
        self.pause_dir.mkdir()
        self.stderr_path = folder / "stderr.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
               "PAUSE_DIR": str(self.pause_dir), "PAUSES": " ".join(pauses)}
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)], cwd=folder, env=env,
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)

    def err(self) -> str:
        return self.stderr_path.read_text()

    def wait_until(self, condition, what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not condition():
            assert self.process.poll() is None, f"the run ended before {what}:\n{self.err()}"
            assert time.monotonic() < deadline, f"no {what} within {WAIT_S} s:\n{self.err()}"
            time.sleep(0.01)

    def wait_paused(self, index: int) -> None:
        self.wait_until(lambda: (self.pause_dir / f"paused-{index}").exists(), f"pause {index}")

    def wait_for_text(self, text: str) -> None:
        self.wait_until(lambda: text in self.err(), repr(text))

    def go(self, index: int) -> None:
        (self.pause_dir / f"go-{index}").touch()

    def interrupt(self) -> None:
        self.process.send_signal(signal.SIGINT)

    def finish(self) -> tuple[int, str]:
        self.process.wait(timeout=WAIT_S)
        return self.process.returncode, self.err()


@pytest.fixture
def spawn():
    """Start pausing children; any still running when the test ends is killed."""
    children = []

    def start(folder: Path, *args, pauses: list[str] = ()) -> Child:
        children.append(Child(folder, args, list(pauses)))
        return children[-1]

    yield start
    for child in children:
        if child.process.poll() is None:
            child.process.kill()
            child.process.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> bytes:
    """The final adapter of an uninterrupted run (in this process: same code, same thread count)."""
    import leantune as lt

    folder = tmp_path_factory.mktemp("reference")
    lt.train(str(write_config(folder, folder / "out")))
    return (folder / "out" / "adapter" / "adapter.safetensors").read_bytes()


def checkpoint_entries(out_dir: Path) -> list[str]:
    return sorted(p.name for p in (out_dir / "checkpoints").iterdir())


def resume_and_compare(config: Path, out_dir: Path, reference: bytes) -> None:
    code, err = finish(leantune("train", config, "--resume", cwd=config.parent))
    assert code == 0, err
    assert "resuming from" in err
    assert (out_dir / "adapter" / "adapter.safetensors").read_bytes() == reference
    steps = [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # records after the checkpoint were replaced, not duplicated


@pytest.mark.parametrize("where", ["in-step:8", "in-checkpoint:8"])
def test_sigkill_mid_step_or_mid_checkpoint_then_resume_is_bitwise_equal(tmp_path, reference, spawn, where):
    out_dir = tmp_path / "out"
    config = write_config(tmp_path, out_dir)
    child = spawn(tmp_path, "train", config, pauses=[where])
    child.wait_paused(0)
    child.process.kill()
    child.process.wait()
    assert not (out_dir / "adapter").exists()
    assert latest_step(out_dir) == 7
    half_written = [name for name in checkpoint_entries(out_dir) if name.startswith(".step-8.tmp-")]
    assert len(half_written) == (where == "in-checkpoint:8")

    resume_and_compare(config, out_dir, reference)
    # the checkpoint cut short by the kill was cleared away, not taken for one
    assert checkpoint_entries(out_dir) == ["latest", "step-23", "step-24"]


def test_sigint_saves_a_checkpoint_and_prints_how_to_resume(tmp_path, reference, spawn):
    out_dir = tmp_path / "out"
    config = write_config(tmp_path, out_dir)
    child = spawn(tmp_path, "train", config, pauses=["after-checkpoint:3"])
    child.wait_paused(0)
    child.interrupt()
    child.wait_for_text(CTRL_C_ACK)
    child.go(0)
    code, err = child.finish()
    assert code == 130, err
    assert "Traceback" not in err
    # the Ctrl-C came right after the checkpoint of step 3 was written: the run stops there
    assert f"interrupted at step 3; checkpoint saved to {out_dir / 'checkpoints' / 'step-3'}." in err
    assert latest_step(out_dir) == 3
    resume_line = [line for line in err.splitlines() if line.startswith("resume with: ")][0]
    command = resume_line.removeprefix("resume with: ")
    assert command.startswith("leantune train ") and command.endswith(" --resume") and str(config) in command

    import shlex

    code, err = finish(leantune(*shlex.split(command)[1:], cwd=tmp_path))
    assert code == 0, err
    assert (out_dir / "adapter" / "adapter.safetensors").read_bytes() == reference


# -- a second Ctrl-C ---------------------------------------------------------------------------------

def after_ack(err: str) -> list[str]:
    """The non-empty lines printed after the first Ctrl-C was acknowledged."""
    return [line for line in err.split(CTRL_C_ACK, 1)[1].splitlines() if line.strip()]


def press_ctrl_c_twice_at(tmp_path, spawn, pause: str):
    """A run paused at `pause` gets Ctrl-C, its acknowledgement, then a second Ctrl-C; returns (out_dir, config, child)."""
    out_dir = tmp_path / "out"
    config = write_config(tmp_path, out_dir)
    child = spawn(tmp_path, "train", config, pauses=[pause])
    child.wait_paused(0)
    child.interrupt()
    child.wait_for_text(CTRL_C_ACK)
    child.interrupt()
    return out_dir, config, child


def test_a_second_ctrl_c_mid_step_stops_at_once_keeping_the_last_checkpoint(tmp_path, spawn):
    out_dir, config, child = press_ctrl_c_twice_at(tmp_path, spawn, "in-step:5")
    code, err = child.finish()
    assert code == 130 and "Traceback" not in err
    assert after_ack(err) == [f"stopped at once after step 4; the last checkpoint is {out_dir / 'checkpoints' / 'step-4'}; "
                              f"resume with: leantune train {config} --set out_dir={out_dir} --resume"]
    assert checkpoint_entries(out_dir) == ["latest", "step-3", "step-4"]


def test_a_second_ctrl_c_while_a_checkpoint_is_written_lets_it_finish_first(tmp_path, spawn):
    out_dir, config, child = press_ctrl_c_twice_at(tmp_path, spawn, "in-checkpoint:5")
    child.wait_for_text(CTRL_C_AGAIN)
    child.go(0)
    code, err = child.finish()
    assert code == 130 and "Traceback" not in err
    assert after_ack(err) == [CTRL_C_AGAIN,
                              f"interrupted at step 5; checkpoint saved to {out_dir / 'checkpoints' / 'step-5'}.",
                              f"resume with: leantune train {config} --set out_dir={out_dir} --resume"]
    assert checkpoint_entries(out_dir) == ["latest", "step-4", "step-5"]
    assert sorted(p.name for p in (out_dir / "checkpoints" / "step-5").iterdir()) == [
        "adapter", "optimizer.json", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"]


def test_a_ctrl_c_while_an_interrupted_run_exits_is_ignored(tmp_path, spawn):
    out_dir = tmp_path / "out"
    config = write_config(tmp_path, out_dir)
    child = spawn(tmp_path, "train", config, pauses=["after-checkpoint:3", "at-exit"])
    child.wait_paused(0)
    child.interrupt()
    child.wait_for_text(CTRL_C_ACK)
    child.go(0)
    child.wait_paused(1)  # the run is saved and the process is shutting down
    child.interrupt()
    child.go(1)
    code, err = child.finish()
    assert code == 130 and "Traceback" not in err
    assert err.rstrip().endswith(f"resume with: leantune train {config} --set out_dir={out_dir} --resume")
    assert latest_step(out_dir) == 3


# -- what a resume may change --------------------------------------------------------------------

def small_config(folder: Path, **changes) -> dict:
    config = yaml.safe_load(write_config(folder, folder / "out").read_text())
    config.update({"max_steps": 2, **changes})
    return config


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> tuple[dict, Path]:
    """A finished two-step run with a checkpoint per step; tests that only get refused share it."""
    import leantune as lt

    folder = tmp_path_factory.mktemp("short")
    config = small_config(folder)
    lt.train(config)
    return config, folder / "out"


def refusal(out_dir: Path, key: str, new: str, old: str) -> str:
    return (f"--resume: config key '{key}' is {new} but the run in '{out_dir}' used {old}; keep {old} to resume "
            "that run, or start a new run with another out_dir or with --overwrite (leantune train --help lists "
            "the keys a resume may change)")


@pytest.mark.parametrize("change, key, new, old", [
    ({"lr": 0.1}, "lr", "0.1", "0.005"),
    ({"seed": 8}, "seed", "8", "7"),
    ({"batch_size": 1}, "batch_size", "1", "2"),
    ({"max_length": 64}, "max_length", "64", "32"),
    ({"schedule": "linear"}, "schedule", "linear", "cosine"),
    ({"warmup": 0}, "warmup", "0", "3"),
    ({"threads": 2}, "threads", "2", "1"),
    ({"model": "tiny-qwen2"}, "model", "tiny-qwen2", "tiny-llama"),
    ({"data": {"train": "other.jsonl", "eval": None}}, "data.train", "other.jsonl", None),
    ({"method": {"name": "lora", "r": 8, "alpha": 8, "dropout": 0.1}}, "method.r", "8", "4"),
    ({"method": {"name": "dora", "r": 4, "alpha": 8, "dropout": 0.1}}, "method.name", "dora", "lora"),
])
def test_resume_refuses_a_changed_run_key_and_keeps_the_run_config(short_run, change, key, new, old):
    import leantune as lt
    from leantune.errors import LeantuneError

    config, out_dir = short_run
    saved = (out_dir / "config.yaml").read_bytes()
    if old is None:  # the data file lies in a temporary folder
        old = config["data"]["train"]
    with pytest.raises(LeantuneError, match=f"^{re.escape(refusal(out_dir, key, new, old))}$"):
        lt.train({**config, **change}, resume=True)
    assert (out_dir / "config.yaml").read_bytes() == saved


def test_resume_names_every_changed_key_in_one_sentence(short_run):
    import leantune as lt
    from leantune.errors import LeantuneError

    config, out_dir = short_run
    with pytest.raises(LeantuneError, match=re.escape(
            "--resume: config keys 'lr' (0.1, the run used 0.005), 'seed' (8, the run used 7) differ from the run "
            f"in '{out_dir}'; keep the run's values to resume it, or start a new run with another out_dir or with "
            "--overwrite")):
        lt.train({**config, "lr": 0.1, "seed": 8}, resume=True)


def test_resume_compares_methods_with_their_defaults_filled_in(short_run):
    from leantune.training.config import build_config
    from leantune.training.rundir import check_resume_identity

    config, out_dir = short_run
    spelled_out = {**config, "method": {**config["method"], "rslora": False, "init": "kaiming"}}
    assert check_resume_identity(out_dir, build_config(spelled_out)) == []


def test_cli_resume_with_a_changed_key_exits_2_with_one_sentence(short_run, tmp_path, monkeypatch, capsys):
    from leantune.cli import main

    config, out_dir = short_run
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    saved = (out_dir / "config.yaml").read_bytes()
    status = main(["train", str(path), "--set", "lr=0.1", "--resume"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert err == f"leantune train: error: {refusal(out_dir, 'lr', '0.1', '0.005')}\n"
    assert (out_dir / "config.yaml").read_bytes() == saved


def test_resume_may_extend_the_run_and_change_reporting_keys_announced_in_one_line(tmp_path, capsys):
    import leantune as lt

    lt.train(small_config(tmp_path))
    capsys.readouterr()
    result = lt.train(small_config(tmp_path, max_steps=3, save_every=2, log_every=1, keep_checkpoints=1), resume=True)
    err = capsys.readouterr().err
    announced = [line for line in err.splitlines() if line.startswith("--resume with changed keys")]
    assert announced == ["--resume with changed keys: max_steps 2 -> 3, save_every 1 -> 2, keep_checkpoints 2 -> 1; "
                         "the learning-rate schedule now spans 3 steps"]
    assert result.steps == 3
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["max_steps"] == 3


def test_resume_refuses_a_run_length_below_the_step_reached(tmp_path):
    import leantune as lt
    from leantune.errors import LeantuneError

    lt.train(small_config(tmp_path))
    (tmp_path / "out" / "summary.json").unlink()  # as if it had stopped right after its last checkpoint
    with pytest.raises(LeantuneError, match=r"--resume: the run in '.*out' is at step 2, past the 1 steps this "
                                            r"config asks for; raise max_steps or epochs to resume it"):
        lt.train(small_config(tmp_path, max_steps=1), resume=True)


def test_the_final_adapter_is_written_once_and_the_last_checkpoint_shares_its_files(tmp_path):
    config = build_config({"model": "tiny-llama", "method": {"name": "lora", "r": 2}, "max_steps": 2, "save_every": 1,
                           "data": {"train": str(_pairs_file(tmp_path)), "eval": None}, "max_length": 32,
                           "out_dir": str(tmp_path / "out"), "progress": False})
    lt.train(config)
    final = tmp_path / "out" / "adapter"
    in_checkpoint = tmp_path / "out" / "checkpoints" / "step-2" / "adapter"
    for name in ("adapter.safetensors", "adapter_config.json"):
        assert (final / name).read_bytes() == (in_checkpoint / name).read_bytes()
        assert os.path.samefile(final / name, in_checkpoint / name)  # one file on disk, linked


def _pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i} ", "completion": f"a{i}"}) + "\n" for i in range(8)))
    return path


def test_a_checkpoint_with_a_non_integer_format_version_is_named_damaged(tmp_path):
    config = build_config({"model": "tiny-llama", "method": {"name": "lora", "r": 2}, "max_steps": 2, "save_every": 1,
                           "data": {"train": str(_pairs_file(tmp_path)), "eval": None}, "max_length": 32,
                           "out_dir": str(tmp_path / "out"), "progress": False})
    lt.train(config)
    state_file = tmp_path / "out" / "checkpoints" / "step-2" / "trainer_state.json"
    state_file.write_text(state_file.read_text().replace('"format_version": 1', '"format_version": "x"'))
    longer = build_config({**yaml.safe_load((tmp_path / "out" / "config.yaml").read_text()), "max_steps": 3})
    with pytest.raises(lt.LeantuneError, match=r"step-2' is damaged: trainer_state.json has format_version 'x', "
                                               r"which must be an integer"):
        lt.train(longer, resume=True)
