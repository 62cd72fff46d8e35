import dataclasses
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from leantune.eval.sandbox import OUTCOMES, Limits, run_code, run_many

REPO = Path(__file__).resolve().parents[1]
# The wall clock is generous so that only the limit a test is about decides its outcome, however
# loaded the machine is; a runaway child still stops after one CPU second.
QUICK = Limits(wall_seconds=60.0, cpu_seconds=1, memory_bytes=512 << 20, output_bytes=64 << 10)
KERNEL_ONLY = dataclasses.replace(QUICK, audit_hook=False)  # what holds without the audit hook
SECRET = "hunter2"
# Bounded on purpose: were forks allowed, this makes at most 5 children, each exiting at once.
FORK_BOMB = """
for attempt in range(5):
    print('attempt', attempt, flush=True)
    if os.fork() == 0:
        os._exit(0)
"""


def source_of(body):
    return "import os, shutil, signal, socket, subprocess, sys, time\n\ndef test_it():\n" + textwrap.indent(
        textwrap.dedent(body), "    ")


def run_test(body, limits=QUICK):
    """Run `def test_it(): <body>` the way generated tests run."""
    return run_code(source_of(body), "test_it", limits)


@functools.lru_cache(maxsize=None)
def kernel_layers():
    return set(run_test("pass").isolation)


def needs(*layers):
    missing = set(layers) - kernel_layers()
    if missing:
        pytest.skip(f"the kernel layers {sorted(missing)} are not available here")


# Runs the sandbox from a parent process of its own, exec'd with a secret in its environment (so
# the secret is in /proc/<parent>/environ, which a setenv in this process would not change), that
# a test may try to kill without harm; it prints the outcome.
PARENT = """
import json, sys
from leantune.eval.sandbox import Limits, run_code
with open('/proc/self/environ', 'rb') as handle:
    assert b'LEANTUNE_TEST_SECRET=%s' in handle.read()
outcome = run_code(sys.argv[1], 'test_it', Limits(**json.loads(sys.argv[2])))
print(json.dumps(outcome.to_dict()))
""" % SECRET


def run_from_a_parent(body, limits=QUICK):
    env = {**os.environ, "LEANTUNE_TEST_SECRET": SECRET, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", PARENT, source_of(body), json.dumps(dataclasses.asdict(limits))],
                          env=env, capture_output=True, text=True, timeout=120,
                          start_new_session=True)  # its own group: a killpg cannot reach pytest
    assert done.returncode == 0, f"the parent did not survive: status {done.returncode}\n{done.stderr}"
    return json.loads(done.stdout)


@pytest.fixture
def outside(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    return victim


@pytest.fixture
def listener():
    """A socket this test process listens on: a connection from the child would reach it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        sock.settimeout(0.5)
        yield sock


def assert_nothing_connected(sock):
    with pytest.raises(TimeoutError):
        sock.accept()


def test_pass_fail_and_error_are_told_apart():
    assert run_test("assert sum([1, 2]) == 3").status == "pass"
    failed = run_test("assert 1 + 1 == 3, 'arithmetic'")
    assert (failed.status, failed.detail) == ("fail", "AssertionError: arithmetic")
    errored = run_test("return undefined_name")
    assert errored.status == "error" and errored.detail.startswith("NameError")
    syntax = run_code("def test_it(:\n    pass\n", "test_it", QUICK)
    assert syntax.status == "error" and syntax.detail.startswith("SyntaxError")
    missing = run_code("x = 1\n", "test_it", QUICK)
    assert missing.status == "error" and "KeyError" in missing.detail


def test_as_root_every_kernel_layer_takes_effect():
    if os.geteuid() != 0:
        pytest.skip("the parent is not root")
    outcome = run_test("assert os.getuid() == os.getgid() == 65534 and os.getgroups() == []")
    assert outcome.status == "pass", outcome.detail
    assert set(outcome.isolation) == {"network", "filesystem", "ipc", "unprivileged", "process_limit",
                                      "no_new_privs"}


def test_the_limits_are_in_effect_inside_the_child():
    limits = dataclasses.replace(QUICK, memory_bytes=256 << 20, open_files=32)
    outcome = run_test(f"""
        import resource
        assert resource.getrlimit(resource.RLIMIT_AS) == ({256 << 20}, {256 << 20})
        assert resource.getrlimit(resource.RLIMIT_CPU) == (1, 2)
        assert resource.getrlimit(resource.RLIMIT_NPROC) == (0, 0)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (32, 32)
        assert resource.getrlimit(resource.RLIMIT_FSIZE) == ({64 << 10}, {64 << 10})
        assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
        assert sys.argv == ['program.py']
    """, limits)
    assert outcome.status == "pass", outcome.detail
    refused = run_test("import resource; resource.setrlimit(resource.RLIMIT_AS, (-1, -1))")
    assert refused.status == "error" and "sandbox: resource.setrlimit" in refused.detail


def test_an_endless_loop_hits_the_cpu_limit_and_the_caller_goes_on():
    # one CPU second against a minute of wall clock: the CPU limit is always reached first
    outcome = run_test("while True:\n    pass", Limits(wall_seconds=60.0, cpu_seconds=1))
    assert (outcome.status, outcome.detail) == ("timeout", "CPU limit of 1 s reached")
    assert outcome.returncode == -signal.SIGXCPU  # the kernel's soft-limit signal, not the parent's kill
    assert run_test("assert True").status == "pass"


def test_an_endless_loop_that_ignores_sigxcpu_hits_the_hard_cpu_limit():
    outcome = run_test("signal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass")
    assert outcome.status == "timeout" and outcome.detail.startswith("CPU limit of 1 s reached")
    assert outcome.returncode == -signal.SIGKILL


def test_a_sleeping_test_hits_the_wall_clock_limit():
    # sleeping costs no CPU time, so only the wall clock can stop it
    outcome = run_test("time.sleep(60)", Limits(wall_seconds=1.0, cpu_seconds=30))
    assert (outcome.status, outcome.detail) == ("timeout", "wall-clock limit of 1.0 s reached")
    assert outcome.returncode == -signal.SIGKILL


# 128 MiB of address space holds the interpreter; the test asks for 512 MiB. Without a working
# memory limit the allocation succeeds (and the test fails); the wall clock (60 s) and CPU time
# (30 s) are far beyond what the allocation takes, so neither can decide the outcome.
SMALL_MEMORY = Limits(wall_seconds=60.0, cpu_seconds=30, memory_bytes=128 << 20)


@pytest.mark.parametrize("body", [
    "block = bytearray(512 << 20)",
    "chunks = [bytearray(8 << 20) for _ in range(64)]",
])
def test_allocation_beyond_the_memory_limit_is_a_memory_error(body):
    outcome = run_test(body, SMALL_MEMORY)
    assert (outcome.status, outcome.detail) == ("error", "MemoryError: ")
    assert outcome.returncode == 0  # the child reported and exited; nothing killed it
    # the same code with room to spare passes: the limit, not the code, decided
    roomy = run_test(body, Limits(wall_seconds=60.0, cpu_seconds=30, memory_bytes=2 << 30))
    assert roomy.status == "pass", roomy.detail


def test_unbounded_allocation_stops_at_the_memory_limit():
    outcome = run_test("chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))", SMALL_MEMORY)
    assert (outcome.status, outcome.detail) == ("error", "MemoryError: ")


@pytest.mark.parametrize("body, signal_name", [
    ("import faulthandler; faulthandler._sigsegv()", "SIGSEGV"),
    ("os.abort()", "SIGABRT"),
    ("os.kill(os.getpid(), signal.SIGKILL)", "SIGKILL"),  # the child may signal itself only
    ("os.kill(os.getpid(), signal.SIGTERM)", "SIGTERM"),
])
def test_a_child_killed_by_a_signal_is_killed_not_error_or_timeout(body, signal_name):
    outcome = run_test(body)
    assert (outcome.status, outcome.detail) == ("killed", f"killed by {signal_name}")


@pytest.mark.parametrize("body", ["sys.exit(0)", "raise SystemExit", "quit()", "exit(0)"])
def test_exiting_the_interpreter_is_an_error_not_a_pass(body):
    outcome = run_test(body)
    assert outcome.status == "error" and outcome.detail.startswith("SystemExit: the test exited the interpreter")


def test_exiting_without_cleanup_is_an_error_the_parent_detects():
    outcome = run_test("os._exit(0)")
    assert outcome.returncode == 0  # nothing to tell it from a pass but the missing report
    assert (outcome.status, outcome.detail) == (
        "error", "the test exited the interpreter (status 0) before reporting an outcome")


def test_a_fork_bomb_is_refused_at_the_first_fork():
    outcome = run_test(FORK_BOMB)
    assert (outcome.status, outcome.detail) == ("error", "PermissionError: sandbox: os.fork is not allowed")
    assert outcome.stdout == "attempt 0\n"


@pytest.mark.parametrize("body", [
    "subprocess.run(['true'])",
    "os.system('true')",
    "os.popen('true')",
    "os.posix_spawn('/bin/true', ['true'], {})",
    "os.spawnv(os.P_WAIT, '/bin/true', ['true'])",
    "os.execv('/bin/true', ['true'])",
    "os.forkpty()",
])
def test_starting_processes_is_refused(body):
    outcome = run_test(body)
    assert outcome.status == "error" and "sandbox: " in outcome.detail, outcome.detail


@pytest.mark.parametrize("body", [
    FORK_BOMB,
    "subprocess.run(['true'])",
    "os.posix_spawn('/bin/true', ['true'], {})",
    "import threading; threading.Thread(target=print).start()",
])
def test_without_the_audit_hook_the_process_limit_still_refuses_new_processes(body):
    needs("process_limit")
    outcome = run_test(body, KERNEL_ONLY)
    assert outcome.status == "error", outcome.detail
    assert "Resource temporarily unavailable" in outcome.detail or "can't start new thread" in outcome.detail
    assert outcome.stdout in ("", "attempt 0\n")


@pytest.mark.parametrize("body", [
    "os.kill(os.getppid(), signal.SIGKILL)",
    "os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
    "signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)",
])
def test_killing_the_parent_is_refused_and_the_parent_survives(body):
    outcome = run_from_a_parent(body)  # asserts the parent lived to report
    assert outcome["status"] == "error", outcome
    assert "sandbox: " in outcome["detail"] or "no attribute 'pidfd_send_signal'" in outcome["detail"]


@pytest.mark.parametrize("body", ["os.kill(os.getppid(), signal.SIGKILL)",
                                  "signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)"])
def test_without_the_audit_hook_the_kernel_refuses_to_signal_a_root_parent(body):
    if os.geteuid() != 0:
        pytest.skip("a non-root caller shares its uid with the child: only the audit hook refuses")
    needs("unprivileged")
    outcome = run_from_a_parent(body, KERNEL_ONLY)
    assert outcome["status"] == "error" and "Operation not permitted" in outcome["detail"], outcome


@pytest.mark.parametrize("body", ["os.kill(1, 0)", "os.kill(-1, 0)", "os.kill(0, 0)", "os.killpg(1, 0)"])
def test_signalling_other_processes_is_refused(body):
    # signal 0 delivers nothing: were it allowed, only the outcome would say so
    outcome = run_test(body)
    assert outcome.status == "error" and "sandbox: os.kill" in outcome.detail


@pytest.mark.parametrize("limits", [QUICK, KERNEL_ONLY], ids=["audit hook", "kernel only"])
def test_the_parents_environment_cannot_be_read(limits):
    if not limits.audit_hook:
        needs("unprivileged")
    outcome = run_from_a_parent(f"""
        assert 'LEANTUNE_TEST_SECRET' not in os.environ and os.environ['HOME'] == os.getcwd()
        parent = os.getppid()
        for path in (f'/proc/{{parent}}/environ', f'/proc/{{parent}}/task/{{parent}}/environ',
                     '/proc/self/environ', '/proc/1/environ'):
            try:
                with open(path, 'rb') as handle:
                    assert b'{SECRET}' not in handle.read(), path
            except OSError as err:
                print(err)
    """, limits)
    assert outcome["status"] == "pass", outcome["detail"]
    refusal = "sandbox: reading" if limits.audit_hook else "Permission denied"
    assert outcome["stdout"].count(refusal) >= 2  # /proc/<parent>/environ, both ways


def test_the_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("LEANTUNE_TEST_SECRET", SECRET)
    outcome = run_test("assert 'LEANTUNE_TEST_SECRET' not in os.environ and os.environ['HOME'] == os.getcwd()")
    assert outcome.status == "pass", outcome.detail


CHANGES_OUTSIDE = [
    "os.remove({path!r})",
    "os.unlink({path!r})",
    "shutil.rmtree({dir!r})",
    "os.rename({path!r}, 'stolen.txt')",
    "open({path!r}, 'w').write('overwritten')",
    "open({path!r}, 'a').write('appended')",
    "os.truncate({path!r}, 0)",
    "os.chdir({dir!r}); os.remove('keep.txt')",
    "os.symlink({path!r}, 'link'); open('link', 'w').write('x')",
]


@pytest.mark.parametrize("how", CHANGES_OUTSIDE + ["subprocess.run(['rm', '-f', {path!r}])",
                                                   "os.system('rm -f {path}')"])
def test_deleting_or_changing_files_outside_the_work_directory_is_refused(outside, how):
    outcome = run_test(how.format(path=str(outside), dir=str(outside.parent)))
    assert outcome.status == "error" and "sandbox:" in outcome.detail
    assert outside.read_text() == "precious"


@pytest.mark.parametrize("how", CHANGES_OUTSIDE)
def test_without_the_audit_hook_the_kernel_refuses_changes_outside_the_work_directory(outside, how):
    needs("filesystem", "unprivileged")
    outcome = run_test(how.format(path=str(outside), dir=str(outside.parent)), KERNEL_ONLY)
    assert outcome.status == "error" and "Errno" in outcome.detail, outcome.detail
    assert outside.read_text() == "precious"


@pytest.mark.parametrize("limits", [QUICK, KERNEL_ONLY], ids=["audit hook", "kernel only"])
def test_creating_files_in_shared_directories_is_refused(tmp_path, limits):
    if not limits.audit_hook:
        needs("filesystem")
    targets = [f"/tmp/{tmp_path.name}-probe", f"/dev/shm/{tmp_path.name}-probe", f"/var/tmp/{tmp_path.name}-probe"]
    outcome = run_test(f"""
        for path in {targets!r}:
            try:
                open(path, 'w').close()
            except OSError as err:
                print(type(err).__name__)
            else:
                raise AssertionError(path)
    """, limits)
    assert outcome.status == "pass", outcome.detail
    assert outcome.stdout.split() == ["PermissionError" if limits.audit_hook else "OSError"] * 3
    assert not any(os.path.exists(path) for path in targets)


def test_files_inside_the_fresh_work_directory_are_allowed_and_cleaned_up():
    outcome = run_test("""
        assert os.listdir('.') == ['program.py']
        print(os.getcwd())
        with open('scratch.txt', 'w') as handle:
            handle.write('data')
        os.mkdir('sub')
        os.rename('scratch.txt', 'sub/moved.txt')
        shutil.rmtree('sub')
    """)
    assert outcome.status == "pass", outcome.detail
    workdir = outcome.stdout.strip()
    assert "leantune-sandbox-" in workdir and not os.path.exists(workdir)


@pytest.mark.parametrize("limits", [QUICK, KERNEL_ONLY], ids=["audit hook", "kernel only"])
def test_no_connection_reaches_a_listening_socket(listener, limits):
    if not limits.audit_hook:
        needs("network")
    port = listener.getsockname()[1]
    outcome = run_test(f"socket.create_connection(('127.0.0.1', {port}), timeout=2)", limits)
    assert outcome.status == "error", outcome.detail
    assert "sandbox: socket." in outcome.detail if limits.audit_hook else "Network is unreachable" in outcome.detail
    assert_nothing_connected(listener)


def test_sockets_are_refused():
    raw = run_test("socket.socket()")
    assert raw.status == "error" and "sandbox: socket." in raw.detail


def test_output_is_captured_as_a_bounded_tail():
    outcome = run_test("print('hello'); print('oops', file=sys.stderr)")
    assert outcome.stdout == "hello\n" and outcome.stderr == "oops\n"
    flood = run_test("while True:\n    print('x' * 1000)")
    assert flood.status == "error" and len(flood.stdout) <= 2000


def test_run_many_keeps_order():
    jobs = [(f"def t():\n    assert {i} % 2 == 0\n", "t") for i in range(6)]
    assert [o.status for o in run_many(jobs, QUICK)] == ["pass", "fail"] * 3


def test_the_study_goes_on_past_every_hostile_program(outside, listener, tmp_path):
    port = listener.getsockname()[1]
    programs = {
        "while True:\n    pass": "timeout",
        "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))": "error",
        FORK_BOMB: "error",
        f"os.remove({str(outside)!r})": "error",
        f"shutil.rmtree({str(outside.parent)!r})": "error",
        f"open('/tmp/{tmp_path.name}-probe', 'w')": "error",
        f"socket.create_connection(('127.0.0.1', {port}), timeout=2)": "error",
        "open(f'/proc/{os.getppid()}/environ', 'rb').read()": "error",
        "os.kill(os.getppid(), 0)": "error",
        "os.kill(1, 0)": "error",
        "os._exit(0)": "error",
        "sys.exit(0)": "error",
        "import faulthandler; faulthandler._sigsegv()": "killed",
        "assert sorted([3, 1, 2]) == [1, 2, 3]": "pass",
    }
    limits = dataclasses.replace(QUICK, memory_bytes=256 << 20)
    outcomes = run_many([(source_of(body), "test_it") for body in programs], limits, workers=2)
    assert [o.status for o in outcomes] == list(programs.values())
    assert all(o.status in OUTCOMES for o in outcomes)
    assert outside.read_text() == "precious" and not os.path.exists(f"/tmp/{tmp_path.name}-probe")
    assert_nothing_connected(listener)
