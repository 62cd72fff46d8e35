"""Training runs under torchrun for tests/test_distributed.py (not a test file itself).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/run_distributed.py SPEC.json

SPEC: {"runs": [{"config": {...}, "resume": false}, ...], "step_pause_s": 0, "kill": null | [rank, step],
"hang": null | [rank, step], "leantune_joins": false}.
The process group is joined once here and shared by every run (lt.train leaves a group it did not
start), unless `leantune_joins`: then the one run joins it itself, with its config's timeout.
`step_pause_s` slows each step so a test can kill the job between checkpoints; `kill` SIGKILLs one
rank when it begins that step; `hang` makes one rank sleep there instead.
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
    if spec.get("hang") and [dist.get_rank(), state["step"] + 1] == spec["hang"]:
        time.sleep(600)  # alive but silent: only the others' collective timeout can end the job
    time.sleep(spec.get("step_pause_s", 0))
    return step(self, state)


Trainer._step = paced_step
if spec.get("leantune_joins"):  # one run; its config's distributed_timeout_s reaches the group
    lt.train(spec["runs"][0]["config"])
    sys.exit(0)
dist.init_process_group("gloo")
for run in spec["runs"]:
    lt.train(run["config"], resume=run.get("resume", False))
dist.destroy_process_group()
