"""Run untrusted Python (model-generated unit tests) in a contained child process.

Each run gets its own child interpreter (`python -I -B`: no user site, no PYTHON* variables, no
bytecode writes) started in a fresh temporary directory with a scrubbed environment and its own
session. Before any untrusted line runs, the child:

1. moves into a new network namespace when the kernel allows it (as root, or through a user
   namespace), so it has no network interfaces besides a down loopback;
2. limits itself with `resource.setrlimit`: CPU seconds, address space, size of files written
   (which also bounds its stdout/stderr), open files, no core dumps;
3. installs an audit hook (`sys.addaudithook`) that refuses sockets, new processes, signals to
   other processes, ctypes, and any file write, creation, deletion, rename, permission change or
   `chdir` outside its directory.

The parent enforces a wall-clock timeout by killing the child's process group. The audit hook is
a guard against accidents of generated code, not a boundary against a determined attacker.

Outcome: "pass" (the code ran and the named test function returned), "fail" (an AssertionError),
"error" (any other exception, including refused operations and MemoryError; or the child died
without reporting), "timeout" (the wall-clock or the CPU limit was reached).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Iterable

from .progress import progress_bar

OUTCOMES = ("pass", "fail", "error", "timeout")
TAIL_CHARS = 2000


@dataclass(frozen=True)
class Limits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 5
    memory_bytes: int = 1 << 30        # address space; the interpreter itself needs ~30 MB
    output_bytes: int = 1 << 20        # largest file the child may write, stdout/stderr included
    open_files: int = 64
    isolate_network: bool = True


@dataclass
class Outcome:
    status: str                        # one of OUTCOMES
    detail: str = ""                   # the exception line, or why the child stopped
    returncode: int | None = None
    stdout: str = ""                   # last TAIL_CHARS characters
    stderr: str = ""
    seconds: float = 0.0
    network_isolated: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The child's side. It is passed with -c, so the untrusted code cannot edit it before it runs.
# argv: workdir, program file, name of the function to call ("" for none), result fd, limits JSON.
_CHILD = r'''
import json, os, sys

def _isolate_network():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    return libc.unshare(flags) == 0

def _limit(limits):
    import resource
    cpu = limits["cpu_seconds"]
    for name, value in (("RLIMIT_CPU", (cpu, cpu + 1)),
                        ("RLIMIT_AS", (limits["memory_bytes"],) * 2),
                        ("RLIMIT_FSIZE", (limits["output_bytes"],) * 2),
                        ("RLIMIT_NOFILE", (limits["open_files"],) * 2),
                        ("RLIMIT_CORE", (0, 0))):
        resource.setrlimit(getattr(resource, name), value)

_REFUSED_PREFIXES = ("socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
                     "os.forkpty", "os.system", "os.kill", "os.killpg", "os.startfile", "pty.",
                     "ctypes.", "_ctypes.", "urllib.", "http.", "ftplib.", "smtplib.", "poplib.",
                     "imaplib.", "nntplib.", "telnetlib.", "webbrowser.", "winreg.", "signal.pthread_kill")
# Events whose path arguments must all lie inside the work directory.
_PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.link", "os.symlink", "os.chmod",
                "os.chown", "os.lchown", "os.chflags", "os.lchflags", "os.truncate", "os.utime",
                "os.setxattr", "os.removexattr", "os.chdir", "os.mkfifo", "os.mknod", "shutil.rmtree",
                "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.copytree",
                "shutil.chown", "shutil.move", "shutil.make_archive", "shutil.unpack_archive"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def _guard(workdir):
    root = os.path.realpath(workdir)
    realpath, fspath, join, sep = os.path.realpath, os.fspath, os.path.join, os.sep

    def inside(path):
        if isinstance(path, int) or path is None:
            return True  # an already-open descriptor, or an absent optional argument
        path = fspath(path)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        full = realpath(join(os.getcwd(), path))
        return full == root or full.startswith(root + sep)

    def writes(mode, flags):
        if isinstance(mode, str) and any(c in mode for c in "wax+"):
            return True
        return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)

    def hook(event, args):
        if event.startswith(_REFUSED_PREFIXES):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            if writes(args[1], args[2]) and not inside(args[0]):
                raise PermissionError(f"sandbox: writing {args[0]!r} outside the work directory is not allowed")
        elif event in _PATH_EVENTS:
            for arg in args:
                if isinstance(arg, (str, bytes, os.PathLike)) and not inside(arg):
                    raise PermissionError(f"sandbox: {event} on {arg!r} outside the work directory is not allowed")

    sys.addaudithook(hook)

def _main():
    workdir, program, call, result_fd, limits = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
    isolated = limits["isolate_network"] and _isolate_network()
    _limit(limits)
    with open(program, encoding="utf-8") as handle:
        source = handle.read()
    _guard(workdir)
    report = {"network_isolated": bool(isolated)}
    try:
        namespace = {"__name__": "sandboxed_program"}
        exec(compile(source, "program.py", "exec"), namespace)
        if call:
            namespace[call]()
        report["status"] = "pass"
    except AssertionError as err:
        report.update(status="fail", detail=("AssertionError: " + str(err))[:500])
    except BaseException as err:
        report.update(status="error", detail=(type(err).__name__ + ": " + str(err))[:500])
    os.write(result_fd, json.dumps(report).encode())
    os.close(result_fd)

_main()
'''


def _scrubbed_environment(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8"}


def _tail(handle) -> str:
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    handle.seek(max(0, size - 4 * TAIL_CHARS))
    return handle.read().decode("utf-8", errors="replace")[-TAIL_CHARS:]


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the child's whole session (it leads its own group) and reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _read_report(read_fd: int) -> dict | None:
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    try:
        report = json.loads(b"".join(chunks).decode())
    except (ValueError, UnicodeDecodeError):
        return None
    return report if isinstance(report, dict) and report.get("status") in OUTCOMES else None


def _without_report(returncode: int, limits: Limits) -> tuple[str, str]:
    """Status and detail for a child that stopped before writing its result."""
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout", f"CPU limit of {limits.cpu_seconds} s reached"
    if returncode == -signal.SIGXFSZ:
        return "error", f"output limit of {limits.output_bytes} bytes reached"
    if returncode < 0:
        return "error", f"killed by {signal.Signals(-returncode).name}"
    return "error", f"exited with status {returncode} without a result"


def run_code(source: str, call: str | None = None, limits: Limits | None = None) -> Outcome:
    """Execute `source` (then call the function named `call`) in a contained child process."""
    limits = limits or Limits()
    workdir = tempfile.mkdtemp(prefix="leantune-sandbox-")
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
            try:
                process.wait(timeout=limits.wall_seconds)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(process)
            seconds = time.monotonic() - start
            report = None if timed_out else _read_report(read_fd)
            if timed_out:
                status, detail = "timeout", f"wall-clock limit of {limits.wall_seconds} s reached"
            elif report is None:
                status, detail = _without_report(process.returncode, limits)
            else:
                status, detail = report["status"], str(report.get("detail", ""))
            return Outcome(status=status, detail=detail, returncode=process.returncode,
                           stdout=_tail(out), stderr=_tail(err), seconds=seconds,
                           network_isolated=bool(report and report.get("network_isolated")))
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
