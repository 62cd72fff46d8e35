"""The sandbox's child side (see `sandbox`): contain this process, then run the untrusted program.

`sandbox` passes this file's text to `python -I -B -c`, so the untrusted code cannot edit it
before it runs; argv: work directory, program file, function to call ("" for none), result
descriptor, limits as JSON. Only the standard library is used. The setup, in order:

1. `unshare`: new mount, IPC and (unless turned off) network namespaces; when not root, inside a
   new user namespace, which the kernel may refuse (the run then says which layers it lacks);
2. the file system: every mount read-only except a bind mount of the work directory (nosuid,
   nodev, noexec); as root, directories an unprivileged user cannot enter that hold `sys.path`
   entries (a home such as /root, 0700) are covered by a tmpfs holding only those entries;
3. rlimits, `PR_SET_NO_NEW_PRIVS`, and, as root, `setuid` to the configured user;
4. the audit hook (`_guard`), unless turned off to test the kernel layers alone.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import resource
import signal
import stat
import sys

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWNET = 0x20000, 0x8000000, 0x10000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 0x1, 0x2, 0x4, 0x8, 0x20, 0x1000
MS_REC, MS_PRIVATE = 0x4000, 0x40000
# Per-mount options of /proc/self/mountinfo that a bind remount must repeat: in a user
# namespace the kernel refuses to clear them ("locked"), and as root clearing them would weaken.
_KEPT_OPTIONS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 0x400,
                 "nodiratime": 0x800, "relatime": 0x200000}
PR_SET_NO_NEW_PRIVS = 38

_REFUSED_PREFIXES = ("socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
                     "os.forkpty", "os.system", "os.killpg", "os.startfile", "pty.", "ctypes.", "_ctypes.",
                     "resource.setrlimit", "resource.prlimit", "urllib.", "http.", "ftplib.", "smtplib.",
                     "poplib.", "imaplib.", "nntplib.", "telnetlib.", "webbrowser.", "winreg.")
# Events whose path arguments must all lie inside the work directory.
_PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.link", "os.symlink", "os.chmod",
                "os.chown", "os.lchown", "os.chflags", "os.lchflags", "os.truncate", "os.utime",
                "os.setxattr", "os.removexattr", "os.chdir", "os.mkfifo", "os.mknod", "shutil.rmtree",
                "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.copytree",
                "shutil.chown", "shutil.move", "shutil.make_archive", "shutil.unpack_archive"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _libc_call(name: str, *args) -> None:
    result = getattr(ctypes.CDLL(None, use_errno=True), name)(*args)
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def _bytes(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def _mount(source: str | None, target: str, flags: int, fstype: str | None = None, data: str | None = None):
    _libc_call("mount", _bytes(source), _bytes(target), _bytes(fstype), ctypes.c_ulong(flags), _bytes(data))


def _mounts() -> list[tuple[str, int]]:
    """(mount point, options to keep) of every mount of this namespace."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as handle:
        fields = [line.split() for line in handle]
    return [(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), f[4]),  # "\040" is a space
             sum(_KEPT_OPTIONS.get(option, 0) for option in f[5].split(","))) for f in fields]


def _blocked_ancestor(path: str) -> str | None:
    """The outermost directory above `path` that other users may not enter, if any."""
    parts = path.split(os.sep)
    for end in range(2, len(parts)):
        ancestor = os.sep.join(parts[:end])
        if not os.stat(ancestor).st_mode & stat.S_IXOTH:
            return ancestor
    return None


def _expose(paths: list[str]) -> None:
    """Cover each directory that blocks some of `paths` with a tmpfs holding just those paths,
    bound at their own names: imports keep working after `setuid`, the rest stays out of reach."""
    covers: dict[str, dict[str, int]] = {}
    for path in sorted({os.path.realpath(p) for p in paths}):
        blocked = _blocked_ancestor(path)
        if blocked and not any(path.startswith(p + os.sep) for p in covers.get(blocked, {})):
            covers.setdefault(blocked, {})[path] = os.open(path, os.O_PATH)  # reachable after the cover
    for blocked, sources in covers.items():
        _mount("tmpfs", blocked, MS_NOSUID | MS_NODEV, "tmpfs", "mode=0755")
        for path, fd in sources.items():
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                os.makedirs(path, 0o755, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
                open(path, "a").close()
            _mount(f"/proc/self/fd/{fd}", path, MS_BIND)
            os.close(fd)


def _read_only_except(workdir: str, expose: bool) -> None:
    _mount(None, "/", MS_REC | MS_PRIVATE)  # first: nothing done below may propagate to the host
    if expose:
        _expose([p for p in sys.path if os.path.exists(p)] + [workdir])
    _mount(workdir, workdir, MS_BIND)
    for point, kept in _mounts():
        extra = MS_NOSUID | MS_NODEV | MS_NOEXEC if point == workdir else MS_RDONLY
        try:
            _mount(None, point, MS_REMOUNT | MS_BIND | kept | extra)
        except FileNotFoundError:
            pass  # a mount hidden under a tmpfs cover: out of reach already


def _unshare(flags: int) -> None:
    """`unshare(flags)`; with a new user namespace, keep this process's uid and gid in it: an
    unmapped process could not nest another user namespace."""
    uid, gid = os.geteuid(), os.getegid()
    _libc_call("unshare", flags)
    if flags & CLONE_NEWUSER:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as handle:
                handle.write(text)


def _isolate(limits: dict, workdir: str) -> list[str]:
    """Namespaces and the read-only file system; the names of the layers that took effect."""
    root = os.geteuid() == 0
    flags = CLONE_NEWNS | CLONE_NEWIPC | (CLONE_NEWNET if limits["isolate_network"] else 0)
    try:
        _unshare(flags | (0 if root else CLONE_NEWUSER))
    except OSError:
        return []
    layers = ["ipc"] + (["network"] if limits["isolate_network"] else [])
    if limits["isolate_filesystem"]:
        try:
            _read_only_except(workdir, expose=root and limits["user"] is not None)
            layers.append("filesystem")
        except OSError:
            pass
    if not root:  # shed this user namespace's capabilities, which could remount the file system
        try:
            _libc_call("unshare", CLONE_NEWUSER)  # unmapped: ids read as 65534, /proc is read-only
        except OSError:
            layers = [layer for layer in layers if layer != "filesystem"]
    return layers


def _limit(limits: dict) -> None:
    cpu = limits["cpu_seconds"]
    for name, value in (("RLIMIT_CPU", (cpu, cpu + 1)),
                        ("RLIMIT_AS", (limits["memory_bytes"],) * 2),
                        ("RLIMIT_FSIZE", (limits["output_bytes"],) * 2),
                        ("RLIMIT_NOFILE", (limits["open_files"],) * 2),
                        ("RLIMIT_NPROC", (limits["processes"],) * 2),
                        ("RLIMIT_CORE", (0, 0))):
        resource.setrlimit(getattr(resource, name), value)


def _drop_privileges(limits: dict, layers: list[str]) -> list[str]:
    """As root: become the configured user (the kernel ignores RLIMIT_NPROC for root), once the
    file system is prepared for it. Exec can never regain privileges either way."""
    _libc_call("prctl", PR_SET_NO_NEW_PRIVS, *map(ctypes.c_ulong, (1, 0, 0, 0)))
    user = limits["user"]
    if os.geteuid() == 0 and user is not None and "filesystem" in layers:
        os.setgroups([])
        os.setgid(user)
        os.setuid(user)
    return ["no_new_privs"] + (["unprivileged", "process_limit"] if os.geteuid() != 0 else [])


def _guard(workdir: str) -> None:
    root, pid = os.path.realpath(workdir), str(os.getpid())
    realpath, fspath, join, sep = os.path.realpath, os.fspath, os.path.join, os.sep

    def resolved(path):
        path = fspath(path)
        return realpath(join(os.getcwd(), os.fsdecode(path) if isinstance(path, bytes) else path))

    def inside(path):
        if isinstance(path, int) or path is None:
            return True  # an already-open descriptor, or an absent optional argument
        full = resolved(path)
        return full == root or full.startswith(root + sep)

    def another_process(path):
        # /proc/<other pid>/..., and any process's environ (this one's is scrubbed anyway)
        parts = resolved(path).split(sep) if not isinstance(path, int) else []
        return parts[1:2] == ["proc"] and len(parts) > 3 and (parts[2].isdigit() and parts[2] != pid
                                                             or parts[-1] == "environ")

    def writes(mode, flags):
        if isinstance(mode, str) and any(c in mode for c in "wax+"):
            return True
        return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)

    def hook(event, args):
        if event.startswith(_REFUSED_PREFIXES) or event == "os.kill" and args[0] != os.getpid():
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            if writes(args[1], args[2]) and not inside(args[0]):
                raise PermissionError(f"sandbox: writing {args[0]!r} outside the work directory is not allowed")
            if another_process(args[0]):
                raise PermissionError(f"sandbox: reading {args[0]!r} of another process is not allowed")
        elif event in _PATH_EVENTS:
            for arg in args:
                if isinstance(arg, (str, bytes, os.PathLike)) and not inside(arg):
                    raise PermissionError(f"sandbox: {event} on {arg!r} outside the work directory is not allowed")

    sys.addaudithook(hook)
    for module in (signal, sys.modules["_signal"]):
        module.__dict__.pop("pidfd_send_signal", None)  # signals any process and raises no audit event


def _run(source: str, call: str) -> dict:
    try:
        namespace = {"__name__": "sandboxed_program"}
        exec(compile(source, "program.py", "exec"), namespace)
        if call:
            namespace[call]()
        return {"status": "pass"}
    except AssertionError as err:
        return {"status": "fail", "detail": ("AssertionError: " + str(err))[:500]}
    except SystemExit as err:  # sys.exit(), exit(), quit(): the test did not return
        return {"status": "error", "detail": f"SystemExit: the test exited the interpreter (code {err.code!r})"[:500]}
    except BaseException as err:
        return {"status": "error", "detail": (type(err).__name__ + ": " + str(err))[:500]}


def main() -> None:
    workdir, program, call, result_fd, limits = (sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]),
                                                 json.loads(sys.argv[5]))
    sys.argv = ["program.py"]  # the program sees a plain argv, not the result descriptor
    try:
        layers = _isolate(limits, workdir)
        os.chdir(workdir)  # onto the work directory's bind mount: the old one is read-only now
        _limit(limits)
        with open(program, encoding="utf-8") as handle:
            source = handle.read()
        layers += _drop_privileges(limits, layers)
        if limits["audit_hook"]:
            _guard(workdir)
    except Exception as err:  # nothing untrusted has run: say the sandbox failed, not the test
        report = {"status": "error", "detail": f"sandbox setup failed: {type(err).__name__}: {err}"[:500]}
    else:
        report = {"isolation": layers, **_run(source, call)}
    os.write(result_fd, json.dumps(report).encode())
    os.close(result_fd)


if __name__ == "__main__":
    main()
