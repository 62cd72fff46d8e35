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


def wait_for_step(process: subprocess.Popen, out_dir: Path, step: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while latest_step(out_dir) < step:
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> bytes:
    """The final adapter of an uninterrupted run (in this process: same code, same thread count)."""
    import leantune as lt

    folder = tmp_path_factory.mktemp("reference")
    lt.train(str(write_config(folder, folder / "out")))
    return (folder / "out" / "adapter" / "adapter.safetensors").read_bytes()


def test_sigkill_at_an_arbitrary_step_then_resume_is_bitwise_equal(tmp_path, reference):
    out_dir = tmp_path / "out"
    config = write_config(tmp_path, out_dir)
    process = leantune("train", config, cwd=tmp_path)
    wait_for_step(process, out_dir, 7)
    process.kill()  # SIGKILL, wherever the run is: mid-step or mid-checkpoint
    process.wait()
    assert not (out_dir / "adapter").exists()
    killed_at = latest_step(out_dir)
    assert 7 <= killed_at < STEPS

    code, err = finish(leantune("train", config, "--resume", cwd=tmp_path))
    assert code == 0, err
    assert "resuming from" in err
    assert (out_dir / "adapter" / "adapter.safetensors").read_bytes() == reference
    steps = [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # records after the checkpoint were replaced, not duplicated
    # temporary directories of a checkpoint cut short by the kill do not pile up as checkpoints
    assert all(p.name.startswith("step-") or p.name == "latest" for p in (out_dir / "checkpoints").iterdir())
    assert len(list((out_dir / "checkpoints").iterdir())) <= 3


def test_sigint_saves_a_checkpoint_and_prints_how_to_resume(tmp_path, reference):
    out_dir = tmp_path / "out"
    config = write_config(tmp_path, out_dir)
    process = leantune("train", config, cwd=tmp_path)
    wait_for_step(process, out_dir, 3)
    process.send_signal(signal.SIGINT)
    code, err = finish(process)
    assert code == 130, err
    assert "Traceback" not in err
    assert "interrupted at step" in err
    stopped_at = int(err.split("interrupted at step ")[1].split(";")[0])
    assert latest_step(out_dir) == stopped_at
    resume_line = [line for line in err.splitlines() if line.startswith("resume with: ")][0]
    command = resume_line.removeprefix("resume with: ")
    assert command.startswith("leantune train ") and command.endswith(" --resume") and str(config) in command

    import shlex

    code, err = finish(leantune(*shlex.split(command)[1:], cwd=tmp_path))
    assert code == 0, err
    assert (out_dir / "adapter" / "adapter.safetensors").read_bytes() == reference


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
    from leantune.training.loop import check_resume_identity

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
