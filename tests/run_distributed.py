"""Training runs under torchrun for tests/test_distributed.py (not a test file itself).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/run_distributed.py SPEC.json

SPEC: {"runs": [{"config": {...}, "resume": false}, ...], "step_pause_s": 0, "kill": null | [rank, step]}.
The process group is joined once here and shared by every run (lt.train leaves a group it did not
start). `step_pause_s` slows each step so a test can kill the job between checkpoints; `kill`
SIGKILLs one rank when it begins that step.
"""
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch.distributed as dist

import leantune as lt
from leantune.training.loop import Trainer

spec = json.loads(Path(sys.argv[1]).read_text())
step = Trainer._step


def paced_step(self, state):
    if spec.get("kill") and [dist.get_rank(), state["step"] + 1] == spec["kill"]:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(spec.get("step_pause_s", 0))
    return step(self, state)


Trainer._step = paced_step
dist.init_process_group("gloo")
for run in spec["runs"]:
    lt.train(run["config"], resume=run.get("resume", False))
dist.destroy_process_group()
