import os
import signal
import textwrap

import pytest

from leantune.eval.sandbox import Limits, run_code, run_many

# The wall clock is generous so that only the limit a test is about decides its outcome, however
# loaded the machine is; a runaway child still stops after one CPU second.
QUICK = Limits(wall_seconds=60.0, cpu_seconds=1, memory_bytes=512 << 20, output_bytes=64 << 10)


def run_test(body, limits=QUICK):
    """Run `def test_it(): <body>` the way generated tests run."""
    source = "import os, shutil, socket, subprocess, sys, time\n\ndef test_it():\n" + textwrap.indent(
        textwrap.dedent(body), "    ")
    return run_code(source, "test_it", limits)


@pytest.fixture
def outside(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    return victim


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


def test_an_endless_loop_hits_the_cpu_limit_and_the_caller_goes_on():
    # one CPU second against a minute of wall clock: the CPU limit is always reached first
    outcome = run_test("while True:\n    pass", Limits(wall_seconds=60.0, cpu_seconds=1))
    assert (outcome.status, outcome.detail) == ("timeout", "CPU limit of 1 s reached")
    assert outcome.returncode == -signal.SIGXCPU  # the kernel's soft-limit signal, not the parent's kill
    assert run_test("assert True").status == "pass"


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


@pytest.mark.parametrize("how", [
    "os.remove({path!r})",
    "os.unlink({path!r})",
    "shutil.rmtree({dir!r})",
    "os.rename({path!r}, 'stolen.txt')",
    "open({path!r}, 'w').write('overwritten')",
    "os.truncate({path!r}, 0)",
    "subprocess.run(['rm', '-f', {path!r}])",
    "os.system('rm -f {path}')",
    "os.chdir({dir!r}); os.remove('keep.txt')",
    "os.symlink({path!r}, 'link'); open('link', 'w').write('x')",
])
def test_deleting_or_changing_files_outside_the_work_directory_is_refused(outside, how):
    code = how.format(path=str(outside), dir=str(outside.parent))
    outcome = run_test(code)
    assert outcome.status == "error" and "sandbox:" in outcome.detail
    assert outside.read_text() == "precious"


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


def test_the_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("LEANTUNE_TEST_SECRET", "hunter2")
    outcome = run_test("assert 'LEANTUNE_TEST_SECRET' not in os.environ and os.environ['HOME'] == os.getcwd()")
    assert outcome.status == "pass", outcome.detail


def test_network_is_refused():
    connect = run_test("socket.create_connection(('127.0.0.1', 9), timeout=1)")
    assert connect.status == "error" and "sandbox: socket." in connect.detail
    raw = run_test("socket.socket()")
    assert raw.status == "error" and "sandbox: socket." in raw.detail


def test_output_is_captured_as_a_bounded_tail():
    outcome = run_test("print('hello'); print('oops', file=sys.stderr)")
    assert outcome.stdout == "hello\n" and outcome.stderr == "oops\n"
    flood = run_test("while True:\n    print('x' * 1000)")
    assert flood.status == "error" and len(flood.stdout) <= 2000


def test_exiting_early_is_not_a_pass():
    assert run_test("os._exit(0)").status == "error"
    assert run_test("sys.exit(0)").status == "error"


def test_run_many_keeps_order():
    jobs = [(f"def t():\n    assert {i} % 2 == 0\n", "t") for i in range(6)]
    assert [o.status for o in run_many(jobs, QUICK)] == ["pass", "fail"] * 3
