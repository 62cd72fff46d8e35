"""Run untrusted Python (model-generated unit tests, mutants of a focal function) in a contained child.

Each run gets its own child interpreter (`python -I -B`: no user site, no PYTHON* variables, no
bytecode writes) in its own session, started in a fresh temporary directory with a scrubbed
environment (a few fixed variables; nothing of the caller's). The parent enforces a wall-clock
timeout by killing the child's process group. Before any untrusted line runs, the child
(`sandbox_child`) sets up two kinds of containment.

Kernel-enforced (a boundary; `Outcome.isolation` names the layers that took effect, since some
need root or user namespaces):

- "network": a new network namespace, with only a loopback that is down: no connection anywhere;
- "filesystem": a new mount namespace in which every mount is read-only except a bind mount of
  the work directory (nosuid, nodev, noexec); "ipc": a new IPC namespace;
- "unprivileged": the child is not root. A root parent has it `setuid` to `Limits.user` (nobody):
  writes to the caller's files, reading /proc/<parent>/environ and signals to the caller's
  processes are then refused with EACCES / EPERM. Directories that user cannot enter but `sys.path` needs (a 0700
  /root holding the interpreter) are covered, in the child's view only, by a tmpfs holding just
  those. A non-root parent's child keeps its uid: the kernel still refuses /proc/<parent>/environ
  (another user namespace), not signals;
- "process_limit": RLIMIT_NPROC (0 by default: no new process or thread). The kernel counts it
  per user and ignores it for root, hence it holds only with "unprivileged" or a non-root caller;
- "no_new_privs": exec can never gain privileges (setuid binaries);
- always: rlimits on CPU seconds, address space, size of files written (which also bounds
  stdout/stderr), open files, no core dumps.

A guard against accidents (`sys.addaudithook`; code that means harm can get around it, e.g. by
forging the report, which the kernel layers above do not prevent): sockets, new processes
(fork, exec, posix_spawn, subprocess, os.system), signals to any other process, ctypes, changing
rlimits, reading another process's /proc files or any /proc/*/environ, and writing, creating,
deleting, renaming or chmod-ing any path outside the work directory are refused with a
PermissionError that starts with "sandbox:". It is all there is where the kernel layers are
missing (a non-root caller without user namespaces), and against signals to processes of the
child's own user: a non-root caller's, or other runs (as root, every run is nobody).

Outcomes (`OUTCOMES`): "pass" the program ran and the named function returned; "fail" it raised
AssertionError; "error" any other exception (refused operations, MemoryError, SystemExit from
sys.exit() or quit()), a child that exited without reporting (os._exit()), or a sandbox that
could not start; "timeout" the wall clock or the CPU limit (soft SIGXCPU or the hard limit's
SIGKILL, told apart from other kills by the child's CPU time) was reached; "killed" the child died
from any other signal: a segfault, an abort, SIGKILL from the OOM killer or itself.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .progress import progress_bar

OUTCOMES = ("pass", "fail", "error", "timeout", "killed")
TAIL_CHARS = 2000
NOBODY = 65534
# Passed with -c: the untrusted program cannot edit it before it runs.
_CHILD = (Path(__file__).parent / "sandbox_child.py").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Limits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 5               # SIGXCPU then; SIGKILL one second later
    memory_bytes: int = 1 << 30        # address space; the interpreter itself needs ~30 MB
    output_bytes: int = 1 << 20        # largest file the child may write, stdout/stderr included
    open_files: int = 64
    processes: int = 0                 # RLIMIT_NPROC: counts every process of the child's user
    user: int | None = NOBODY          # uid and gid the child takes when started as root; None: stay root
    isolate_network: bool = True
    isolate_filesystem: bool = True
    audit_hook: bool = True            # False only to test that the kernel layers hold by themselves


@dataclass
class Outcome:
    status: str                        # one of OUTCOMES
    detail: str = ""                   # the exception line, or why the child stopped
    returncode: int | None = None
    stdout: str = ""                   # last TAIL_CHARS characters
    stderr: str = ""
    seconds: float = 0.0
    isolation: tuple[str, ...] = ()    # the kernel-enforced layers that took effect (see the docstring)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _scrubbed_environment(workdir: str) -> dict[str, str]:
    # one thread per math library: with no new threads allowed, a thread pool would fail to start
    threads = dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"), "1")
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", **threads}


def _tail(handle) -> str:
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    handle.seek(max(0, size - 4 * TAIL_CHARS))
    return handle.read().decode("utf-8", errors="replace")[-TAIL_CHARS:]


def _wait(process: subprocess.Popen, wall_seconds: float) -> tuple[bool, float]:
    """Wait up to `wall_seconds`, past that SIGKILL the child's session (it leads its own group);
    reap it. Whether it timed out, and the CPU seconds it used (to tell the CPU limit's SIGKILL
    from other ones)."""
    pidfd = os.pidfd_open(process.pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        timed_out = not poller.poll(max(0, int(wall_seconds * 1000)))
    finally:
        os.close(pidfd)
    if timed_out:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return timed_out, usage.ru_utime + usage.ru_stime


def _read_report(read_fd: int) -> dict | None:
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    try:
        report = json.loads(b"".join(chunks).decode())
    except (ValueError, UnicodeDecodeError):
        return None
    return report if isinstance(report, dict) and report.get("status") in OUTCOMES else None


def _without_report(returncode: int, cpu_seconds: float, limits: Limits) -> tuple[str, str]:
    """Status and detail for a child that stopped before writing its result."""
    cpu_limit = f"CPU limit of {limits.cpu_seconds} s reached"
    if returncode == -signal.SIGXCPU:
        return "timeout", cpu_limit
    if returncode == -signal.SIGKILL and cpu_seconds >= limits.cpu_seconds + 0.5:
        return "timeout", cpu_limit + " (SIGXCPU was ignored; the hard limit killed it)"
    if returncode == -signal.SIGXFSZ:
        return "killed", f"output limit of {limits.output_bytes} bytes reached (SIGXFSZ)"
    if returncode < 0:
        return "killed", f"killed by {signal.Signals(-returncode).name}"
    return "error", f"the test exited the interpreter (status {returncode}) before reporting an outcome"


def _workdir(limits: Limits) -> str:
    workdir = tempfile.mkdtemp(prefix="leantune-sandbox-")
    if os.geteuid() == 0 and limits.user is not None:
        os.chown(workdir, limits.user, limits.user)  # the child writes here after its setuid
    return workdir


def run_code(source: str, call: str | None = None, limits: Limits | None = None) -> Outcome:
    """Execute `source` (then call the function named `call`) in a contained child process."""
    limits = limits or Limits()
    workdir = _workdir(limits)
    read_fd, write_fd = os.pipe()
    start = time.monotonic()
    try:
        program = os.path.join(workdir, "program.py")
        with open(program, "w", encoding="utf-8") as handle:
            handle.write(source)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            command = [sys.executable, "-I", "-B", "-c", _CHILD, workdir, program, call or "",
                       str(write_fd), json.dumps(dataclasses.asdict(limits))]
            process = subprocess.Popen(command, cwd=workdir, env=_scrubbed_environment(workdir),
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                       pass_fds=(write_fd,), start_new_session=True)
            os.close(write_fd)
            write_fd = -1
            timed_out, cpu_seconds = _wait(process, limits.wall_seconds)
            seconds = time.monotonic() - start
            report = None if timed_out else _read_report(read_fd)
            if timed_out:
                status, detail = "timeout", f"wall-clock limit of {limits.wall_seconds} s reached"
            elif report is None:
                status, detail = _without_report(process.returncode, cpu_seconds, limits)
            else:
                status, detail = report["status"], str(report.get("detail", ""))
            return Outcome(status=status, detail=detail, returncode=process.returncode,
                           stdout=_tail(out), stderr=_tail(err), seconds=seconds,
                           isolation=tuple((report or {}).get("isolation", ())))
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
        shutil.rmtree(workdir, ignore_errors=True)


def run_many(jobs: Iterable[tuple[str, str | None]], limits: Limits | None = None, workers: int = 2,
             progress: bool = False, desc: str = "sandbox") -> list[Outcome]:
    """`run_code` for each (source, call) pair, `workers` children at a time, results in order.

    `progress` shows a bar (labelled `desc`) over the finished runs on a terminal's stderr.
    """
    jobs = list(jobs)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            progress_bar(len(jobs), desc, "test", progress) as bar:
        futures = [pool.submit(run_code, source, call, limits) for source, call in jobs]
        try:
            for _ in concurrent.futures.as_completed(futures):
                bar.update(1)
        except BaseException:  # Ctrl-C: leave the queued runs unstarted instead of waiting for them all
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        return [future.result() for future in futures]
