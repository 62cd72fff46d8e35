"""Real torchrun processes (gloo, 2 ranks, tiny-llama): DDP and FSDP2 train what one process trains,
only rank 0 writes, a killed job resumes exactly, a killed rank stops the job in bounded time."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import leantune as lt
from leantune.errors import LeantuneError
from leantune.files import load_tensors

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "run_distributed.py"
LAUNCH_TIMEOUT_S = 240  # bound on one torchrun launch; each tiny run takes seconds
TOLERANCE = 1e-5  # float32, summation order differs between one process and two

METHODS = {
    "lora": {"name": "lora", "r": 4, "alpha": 8},
    "paca": {"name": "paca", "r": 4, "alpha": 8},
    "prompt": {"name": "prompt", "num_virtual_tokens": 4, "init": "vocab"},
    "full": {"name": "full"},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    # 11 examples in micro-batches of 4: the last batch of each epoch has 3 rows, so one rank gets 1
    with open(path, "w") as handle:
        for i in range(11):
            handle.write(json.dumps({"prompt": f"{i} times {i + 3} is ", "completion": str(i * (i + 3))}) + "\n")
    return path


def config(data: Path, out_dir: Path, method: str | dict, **overrides) -> dict:
    base = {"model": "tiny-llama", "method": METHODS.get(method) if isinstance(method, str) else method, "data": {"train": str(data), "eval": str(data)},
            "max_length": 32, "batch_size": 4, "grad_accum": 1, "lr": 5e-3, "warmup": 1, "max_steps": 4,
            "save_every": 0, "seed": 5, "threads": 1, "progress": False, "chunked_loss": True,
            "loss_chunk_tokens": 8, "out_dir": str(out_dir)}
    return {**base, **overrides}


def torchrun(spec: dict, folder: Path, nproc: int = 2, **popen) -> subprocess.Popen:
    spec_path = folder / f"spec-{time.monotonic_ns()}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", str(DRIVER), str(spec_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def run_ok(spec: dict, folder: Path, nproc: int = 2) -> str:
    process = torchrun(spec, folder, nproc)
    out, err = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    assert process.returncode == 0, err[-3000:]
    return err


def adapter(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_tensors(Path(out_dir) / "adapter" / "adapter.safetensors")


def assert_same_adapter(a: dict, b: dict, tolerance: float = TOLERANCE, exact: bool = False) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=tolerance, msg=key)


def trained_in_one_process(cfg: dict) -> dict[str, torch.Tensor]:
    lt.train(cfg)
    return adapter(cfg["out_dir"])


# The DDP and FSDP2 cases of one launch (the process start-up is most of a run's cost).
CASES = [("ddp", "lora", 1), ("ddp", "lora", 2), ("ddp", "paca", 1), ("ddp", "paca", 2), ("ddp", "prompt", 1),
         ("ddp", "prompt", 2), ("fsdp", "lora", 1), ("fsdp", "paca", 2), ("fsdp", "full", 1)]


@pytest.fixture(scope="module")
def two_process_runs(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    runs = [{"config": config(data, folder / f"{mode}-{method}-{accum}", method, grad_accum=accum, distributed=mode)}
            for mode, method, accum in CASES]
    run_ok({"runs": runs}, folder)
    return folder


@pytest.mark.parametrize("mode,method,accum", CASES)
def test_two_processes_train_the_adapter_one_process_trains(two_process_runs, data, tmp_path, mode, method, accum):
    """The global micro-batch (batch_size) split over 2 ranks = the same batch in one process, with the
    chunked loss, with and without gradient accumulation, and with a rank holding a single row."""
    reference = trained_in_one_process(config(data, tmp_path / "one", method, grad_accum=accum))
    assert_same_adapter(adapter(two_process_runs / f"{mode}-{method}-{accum}"), reference)
    summary = json.loads((two_process_runs / f"{mode}-{method}-{accum}" / "summary.json").read_text())
    assert summary["processes"] == 2 and len(summary["peak_memory_bytes_per_process"]) == 2
    alone = json.loads((tmp_path / "one" / "summary.json").read_text())  # eval batches shared out over the ranks
    for key in ("eval_loss_before", "eval_loss_after"):
        assert abs(summary[key] - alone[key]) < 1e-5, key


def test_fsdp_adapter_is_complete_and_reloads_with_the_same_logits(two_process_runs):
    """No empty (Size([0])) shards in the saved adapter: it loads into one plain process."""
    out_dir = two_process_runs / "fsdp-lora-1"
    saved = adapter(out_dir)
    assert all(t.numel() > 0 for t in saved.values())
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    model = lt.load_adapter(lt.load_model("tiny-llama"), out_dir / "adapter")
    reference = lt.load_adapter(lt.load_model("tiny-llama"), two_process_runs / "ddp-lora-1" / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def test_leantune_train_nproc_writes_once_from_rank_0(data, tmp_path):
    out_dir = tmp_path / "run"
    cfg = config(data, out_dir, "lora", distributed="fsdp", save_every=2, max_steps=5, eval_every=2)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "leantune.cli", "train", str(path), "--nproc", "2"], env=env,
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("adapter saved to") == 1  # one summary: rank 0 alone prints
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]  # each step once: one writer
    assert sorted(p.name for p in (out_dir / "checkpoints").iterdir()) == ["latest", "step-4", "step-5"]
    reference = trained_in_one_process(config(data, tmp_path / "one", "lora", save_every=2, max_steps=5))
    assert_same_adapter(adapter(out_dir), reference)


def children(pid: int) -> list[int]:
    found = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(word) for word in found.split()]


def latest_step(out_dir: Path) -> int:
    try:
        return int((out_dir / "checkpoints" / "latest").read_text().strip().split("-")[1])
    except (OSError, IndexError, ValueError):
        return -1


def test_a_killed_job_resumes_equal_to_an_uninterrupted_run(data, tmp_path):
    """SIGKILL of torchrun and both ranks after a checkpoint; --resume under 2 processes ends bitwise equal
    to the uninterrupted 2-process run, dropout draws included."""
    lora_dropout = {**METHODS["lora"], "dropout": 0.1}
    settings = dict(distributed="ddp", save_every=1, max_steps=8, grad_accum=2)
    whole = config(data, tmp_path / "whole", lora_dropout, **settings)
    killed = config(data, tmp_path / "killed", lora_dropout, **settings)
    run_ok({"runs": [{"config": whole}]}, tmp_path)

    process = torchrun({"runs": [{"config": killed}], "step_pause_s": 0.4}, tmp_path)
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while latest_step(Path(killed["out_dir"])) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    for pid in [process.pid, *children(process.pid)]:  # torchrun starts each rank in a session of its own
        os.kill(pid, signal.SIGKILL)
    process.communicate(timeout=30)
    assert 3 <= latest_step(Path(killed["out_dir"])) < 8, "the job was not killed mid-run"
    run_ok({"runs": [{"config": killed, "resume": True}]}, tmp_path)
    assert_same_adapter(adapter(killed["out_dir"]), adapter(whole["out_dir"]), exact=True)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_checkpoint_resumes_under_any_number_of_processes(data, tmp_path, mode):
    """Checkpoints hold whole tensors: a 2-process run's step-3 checkpoint, resumed in 2 processes, ends
    bitwise where the run ended (the optimizer state placed back into the shards); resumed in one process,
    within float tolerance (no dropout here: its draws depend on how the batch is split)."""
    two = config(data, tmp_path / "two", "lora", distributed=mode, save_every=1, max_steps=8, keep_checkpoints=8)
    run_ok({"runs": [{"config": two}]}, tmp_path)
    copies = {}
    for name in ("again", "one"):
        copies[name] = tmp_path / name
        subprocess.run(["cp", "-r", two["out_dir"], str(copies[name])], check=True)
        (copies[name] / "summary.json").unlink()
        (copies[name] / "checkpoints" / "latest").write_text("step-3\n")
    run_ok({"runs": [{"config": {**two, "out_dir": str(copies["again"])}, "resume": True}]}, tmp_path)
    assert_same_adapter(adapter(copies["again"]), adapter(two["out_dir"]), exact=True)
    lt.train({**two, "out_dir": str(copies["one"]), "distributed": "none"}, resume=True)
    assert_same_adapter(adapter(copies["one"]), adapter(two["out_dir"]))


def test_a_killed_rank_stops_the_job_naming_it_and_the_checkpoint_stays_intact(data, tmp_path):
    cfg = config(data, tmp_path / "run", "paca", distributed="fsdp", save_every=1, max_steps=6,
                 distributed_timeout_s=30)
    started = time.monotonic()
    process = torchrun({"runs": [{"config": cfg}], "kill": [1, 4]}, tmp_path)
    _, err = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    assert process.returncode != 0 and time.monotonic() - started < 120
    assert "rank: 1" in err and "Signal 9" in err, err[-2000:]
    out_dir = Path(cfg["out_dir"])
    assert latest_step(out_dir) == 3
    model = lt.load_adapter(lt.load_model("tiny-llama"), out_dir / "checkpoints" / "step-3" / "adapter")
    assert lt.summary(model)["trainable"] > 0


def test_a_rank_that_hangs_is_ended_by_the_collective_timeout_not_waited_for(data, tmp_path):
    cfg = config(data, tmp_path / "run", "lora", distributed="ddp", save_every=1, max_steps=6,
                 distributed_timeout_s=5)
    started = time.monotonic()
    process = torchrun({"runs": [{"config": cfg}], "hang": [1, 3], "leantune_joins": True}, tmp_path)
    _, err = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    assert process.returncode != 0 and time.monotonic() - started < 120, err[-2000:]
    assert "rank: 0" in err and "imed out" in err, err[-3000:]  # rank 0 timed out waiting for rank 1
    assert latest_step(Path(cfg["out_dir"])) == 2


def test_refusals_name_the_key(data, tmp_path):
    nf4 = config(data, tmp_path / "q", "lora", distributed="fsdp")
    nf4["method"] = {**METHODS["lora"], "quantize": "nf4"}
    process = torchrun({"runs": [{"config": nf4}]}, tmp_path)
    _, err = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    assert process.returncode != 0 and "distributed: fsdp with an NF4 base" in err
    process = torchrun({"runs": [{"config": config(data, tmp_path / "n", "lora")}]}, tmp_path)
    _, err = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    assert process.returncode != 0 and "config key 'distributed' is none" in err
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config(data, tmp_path / "c", "lora")))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for extra, message in ((["--nproc", "2"], "config key 'distributed' is none"),
                           (["--nproc", "0", "--set", "distributed=ddp"], "--nproc must be at least 1")):
        done = subprocess.run([sys.executable, "-m", "leantune.cli", "train", str(path), *extra], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(LeantuneError, match="distributed"):
        lt.train({**config(data, tmp_path / "d", "lora"), "distributed": "zero3"})
