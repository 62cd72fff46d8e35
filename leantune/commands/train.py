"""`leantune train [CONFIG.yaml] [--set key=value ...] [--resume] [--overwrite] [--nproc N]`."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from typing import Any

from ..errors import LeantuneError

EXIT_INTERRUPTED = 130

USAGE_NOTES = """\
With no CONFIG the embedded default job runs (leantune/configs/default.yaml): SmolLM2-135M
learns to write unit tests for HumanEval functions, then prints a before/after table.
A commented example with every key: configs/example.yaml.

Ctrl-C saves a checkpoint after the current step and prints the command that resumes the run;
a second Ctrl-C stops at once (a checkpoint being written is finished first). Either way the
exit status is 130. Under torchrun (--nproc) Ctrl-C stops every process; --resume continues from
the last periodic checkpoint.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.keys import keys_help  # light (no torch): the epilog lists every config key

    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml",
                        help="training config (YAML); omitted: the embedded default job")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, dotted for nested keys (method.r=16, data.eval=null); repeatable")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in out_dir from its latest checkpoint (see below for the keys "
                             "that may change)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier run in a non-empty out_dir")
    parser.add_argument("--nproc", type=int, default=None, metavar="N",
                        help="train in N processes on this machine, started by torchrun (config key distributed: "
                             "ddp or fsdp); for several machines run torchrun -m leantune train yourself "
                             "(docs/distributed.md)")
    parser.epilog = USAGE_NOTES + "\n" + keys_help()


def run(args: argparse.Namespace) -> int:
    # imported here, not at module level: `leantune --help` must not load torch
    from ..job import train
    from ..training import load_config

    config = load_config(args.config, args.overrides)
    if args.nproc is not None:
        return _launch_torchrun(args, config)
    previous = _install_sigint(_interrupt_then_ignore)
    try:
        result = train(config, resume=args.resume, overwrite=args.overwrite, command=_rebuild_command(args))
    except KeyboardInterrupt:
        raise  # the process exits with 130, and _interrupt_then_ignore keeps later presses from cutting that short
    except BaseException:
        _install_sigint(previous)
        raise
    if result.interrupted:
        _install_sigint(signal.SIG_IGN)  # the run is saved: a further Ctrl-C must not turn the exit into a traceback
        return EXIT_INTERRUPTED
    _install_sigint(previous)
    return 0


def _launch_torchrun(args: argparse.Namespace, config) -> int:
    """This same command in `nproc` processes, each started by torchrun on this machine."""
    if args.nproc < 1:
        raise LeantuneError(f"--nproc must be at least 1, got {args.nproc}")
    if config.distributed == "none":
        raise LeantuneError(f"--nproc {args.nproc}: config key 'distributed' is none; set distributed: ddp or fsdp "
                            "(--set distributed=ddp)")
    words = ([args.config] if args.config else []) + [w for o in args.overrides for w in ("--set", o)]
    words += ["--resume"] * args.resume + ["--overwrite"] * args.overwrite
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "leantune", "train", *words]
    env = dict(os.environ)
    # torch's threads per process: the config's, else this machine's cores shared out (torchrun would pick 1)
    env.setdefault("OMP_NUM_THREADS", str(config.threads or max(1, (os.cpu_count() or 1) // args.nproc)))
    # torchrun receives Ctrl-C with the rest of the terminal's process group and stops the processes it
    # started; this launcher waits for it, so a handler (not SIG_IGN, which the children would inherit).
    previous = _install_sigint(lambda signum, frame: None)
    try:
        return subprocess.call(command, env=env)
    finally:
        _install_sigint(previous)


def _interrupt_then_ignore(signum: int, frame: Any) -> None:
    """Ctrl-C outside the training loop (loading, the final evaluation): stop, and ignore the presses that
    follow, which would otherwise land in interpreter shutdown (atexit hooks) and print a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _install_sigint(handler: Any) -> Any:
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, handler)


def _rebuild_command(args: argparse.Namespace) -> list[str]:
    """The command line that gives the same config, without out_dir (the resume hint adds the real one)."""
    words = ["leantune", "train"] + ([args.config] if args.config else [])
    for override in args.overrides:
        if override.partition("=")[0].strip() != "out_dir":
            words += ["--set", override]
    return words
