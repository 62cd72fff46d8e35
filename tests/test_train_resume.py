"""Kill and interrupt real `leantune train` processes; resumed runs must end bitwise equal to uninterrupted ones."""
import json
import os
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
