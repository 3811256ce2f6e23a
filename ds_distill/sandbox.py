"""Run untrusted Python (model-generated code) in a sandbox: one fresh process per program.

    outcome = run_python(source, Limits(timeout_s=10))   # -> Outcome(status='passed' | 'failed' | 'timeout', ...)

What each program gets (Linux):
  - its own process, started through this file run as a script (`python -I sandbox.py --child`), which
    1. unshares a mount, a network and a PID namespace (plus a user namespace when not run as root);
    2. forks: the program becomes PID 1 of the new PID namespace, so when it ends or is killed, every process it
       started dies with it (a fork bomb cannot leave survivors, even ones that called setsid);
    3. in the new mount namespace binds its fresh temporary directory onto itself and remounts every other mount
       read-only (writes outside its directory fail with EROFS, /tmp and /dev/shm included);
    4. has no network: the new network namespace holds only a loopback interface that is down;
    5. sets resource limits: CPU seconds, address space (memory), processes, file size, open files, no core dumps;
    6. when run as root, drops to an otherwise unused uid/gid (so that the process limit counts only this
       sandbox's processes: the kernel does not apply RLIMIT_NPROC to root);
    7. runs the program with `python -I -B` (isolated mode: no PYTHON* variables, no user site) in its directory,
       with a minimal environment (HOME and TMPDIR point at the directory). As root, the interpreter's own
       installation is bind-mounted (read-only) next to the directory, so the fresh uid can run it even when it
       lives under /root: the program then sees the standard library only, not a virtual environment's packages.
  - a wall-clock timeout: the runner kills PID 1 of the namespace (and with it everything inside); the caller
    kills the runner's whole process group as a backstop.
  - stdout / stderr go to files outside the sandbox directory, capped by the file-size limit.

If the kernel refuses a namespace (some containers forbid them), the run goes on with what could be set up and
`Outcome.isolation` says what is missing; without a network namespace an audit hook inside the program refuses
sockets and subprocesses (weaker: code that calls C directly through ctypes gets past it). Callers that need the
full sandbox check `Outcome.isolation` (`missing_isolation`).

What it does NOT protect against: kernel exploits and anything that escapes namespaces; reading files (the whole
filesystem stays readable, secrets in world-readable files included); CPU and memory-bandwidth contention with
other work on the machine during the timeout; side channels; programs that use the limits themselves to harm the
caller (at most `max_procs` processes x `memory_mb` each, for `timeout_s`). It is not a security boundary for
hostile code at scale: run large untrusted workloads in a VM or a container built for it.

This file must import only the standard library: it is executed as a script by a fresh interpreter.
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = (
    1, 2, 4, 8, 32, 1024, 2048, 4096, 16384)
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
# per-mount options of /proc/self/mountinfo that a read-only remount must keep (a user namespace may not clear them)
_KEEP_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
               "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
UID_BASE = 0x40000000  # root only: the sandbox runs as UID_BASE + (runner pid % 2^20), a uid nothing else uses
ISOLATION_KEYS = ("pid_namespace", "net_namespace", "mount_namespace", "readonly_fs", "unprivileged_uid")

# Installed in front of the program only when no network namespace could be made.
_NETWORK_GUARD = '''import sys as _s
def _ds_distill_guard(event, args):
    if event.startswith(("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn")):
        raise PermissionError("sandbox: " + event + " is not allowed")
_s.addaudithook(_ds_distill_guard)
del _s, _ds_distill_guard
'''


@dataclass
class Limits:
    timeout_s: float = 10.0
    """Wall-clock seconds before the program (and everything it started) is killed."""
    cpu_s: int = 10
    """CPU seconds per process (RLIMIT_CPU)."""
    memory_mb: int = 1024
    """Address space per process in MiB (RLIMIT_AS)."""
    max_procs: int = 16
    """Processes (and threads) the sandbox may hold at once (RLIMIT_NPROC, counted per uid)."""
    max_file_mb: int = 16
    """Largest file the program may write, stdout and stderr included (RLIMIT_FSIZE)."""
    max_open_files: int = 64
    """Open file descriptors per process (RLIMIT_NOFILE)."""


@dataclass
class Outcome:
    status: str
    """passed (exit 0) | failed (non-zero exit or killed by a limit) | timeout (wall clock)."""
    returncode: int
    """The program's exit code, or -signal when a signal ended it (SIGKILL at the timeout, SIGXCPU for CPU)."""
    seconds: float
    stdout: str = ""
    stderr: str = ""
    isolation: dict = field(default_factory=dict)
    """Which protections were in place (ISOLATION_KEYS -> bool) and errors met while setting them up."""


def missing_isolation(outcome: Outcome) -> list[str]:
    """The ISOLATION_KEYS that were not in place for this run ([] = the full sandbox)."""
    return [k for k in ISOLATION_KEYS if not outcome.isolation.get(k)]


def run_python(source: str, limits: Limits = Limits(), output_chars: int = 4000) -> Outcome:
    """Run `source` as a Python program in a fresh sandbox (see the module docstring); never raises for anything
    the program does. stdout / stderr are returned truncated to their last `output_chars` characters."""
    base = tempfile.mkdtemp(prefix="ds_distill_sandbox_")
    os.chmod(base, 0o711)  # the sandbox uid (root only) must reach work/; nobody may list or write base
    work = os.path.join(base, "work")
    os.mkdir(work, 0o700)
    with open(os.path.join(work, "main.py"), "w", encoding="utf-8") as f:
        f.write(source)
    out_path, err_path = os.path.join(base, "stdout"), os.path.join(base, "stderr")
    report_r, report_w = os.pipe()
    t0 = time.monotonic()
    try:
        private = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        with open(os.open(out_path, private, 0o600), "wb") as out, open(os.open(err_path, private, 0o600), "wb") as err:
            cfg = {"work": work, "limits": asdict(limits), "report_fd": report_w}
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), "--child",
                                     json.dumps(cfg)], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    pass_fds=(report_w,), start_new_session=True, cwd=base,
                                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"})
            os.close(report_w)
            report_w = -1
            try:
                proc.wait(timeout=limits.timeout_s + 10.0)  # the runner enforces timeout_s; this is a backstop
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                proc.wait()
        _kill_group(proc.pid)  # anything still in the runner's session (only without a PID namespace)
        seconds = time.monotonic() - t0
        with os.fdopen(report_r, "r") as f:
            report_r = -1
            lines = [json.loads(line) for line in f.read().splitlines() if line.strip()]
        info: dict = {}
        for line in lines:
            info.update(line)
        isolation = info.get("isolation", {})
        if "setup_error" in info:
            isolation["setup_error"] = info["setup_error"]
        if "exit" not in info:  # the runner itself died (killed by the backstop, or a bug in setup)
            isolation.setdefault("runner_error", f"runner exit {proc.returncode}")
            status, code = ("timeout" if seconds >= limits.timeout_s else "failed"), proc.returncode
        else:
            code = info["exit"]
            status = "timeout" if info.get("timed_out") else ("passed" if code == 0 else "failed")
        return Outcome(status=status, returncode=code, seconds=seconds, stdout=_tail(out_path, output_chars),
                       stderr=_tail(err_path, output_chars), isolation=isolation)
    finally:
        for fd in (report_r, report_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(base, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: str, chars: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * chars))
            return f.read().decode("utf-8", "replace")[-chars:]
    except OSError:
        return ""


# ----------------------------------------------------------------------------------------------------------------
# The runner (this file run as a script): namespaces, fork, limits, exec, timeout
# ----------------------------------------------------------------------------------------------------------------

def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    libc.unshare.argtypes = [ctypes.c_int]
    return libc


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _mount_points() -> list[tuple[str, int]]:
    """(mount point, flags to keep) of every mount in this mount namespace, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            point = parts[4].encode().decode("unicode_escape")  # octal escapes such as \040 for a space
            flags = 0
            for opt in parts[5].split(","):
                flags |= _KEEP_FLAGS.get(opt, 0)
            out.append((point, flags))
    return out


def _readonly_except(libc, work: str, iso: dict) -> None:
    """Bind `work` onto itself, then remount every other mount read-only (this mount namespace only)."""
    _check(libc.mount(b"/", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    _check(libc.mount(work.encode(), work.encode(), None, MS_BIND | MS_REC, None), f"bind {work}")
    failed = []
    for point, keep in _mount_points():
        if point == work:
            continue
        rc = libc.mount(None, point.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep, None)
        if rc != 0:
            failed.append(f"{point}: {os.strerror(ctypes.get_errno())}")
    probe = os.path.join(os.path.dirname(work), ".probe")  # the sandbox's parent dir: must now refuse writes
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
        writable_outside = True
    except OSError:
        writable_outside = False
    iso["readonly_fs"] = not failed and not writable_outside
    if failed:
        iso["readonly_errors"] = failed[:8]


def _child(cfg: dict, libc, iso: dict, uid: int | None) -> None:
    """PID 1 of the new namespace: mounts, limits, identity, then exec the program (never returns)."""
    work, lim = cfg["work"], cfg["limits"]
    python = sys.executable
    if uid is not None and iso.get("mount_namespace"):
        # the fresh uid may not reach this interpreter (e.g. under /root, mode 0700): bind its installation into
        # the sandbox's base directory and run it from there (stdlib only: no virtual environment's packages)
        prefix, exe = os.path.realpath(sys.base_prefix), os.path.realpath(sys.executable)
        if exe.startswith(prefix + os.sep):
            target = os.path.join(os.path.dirname(work), "python")
            os.mkdir(target, 0o755)
            _check(libc.mount(b"/", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
            _check(libc.mount(prefix.encode(), target.encode(), None, MS_BIND | MS_REC, None), f"bind {prefix}")
            python = os.path.join(target, os.path.relpath(exe, prefix))
    if iso.get("mount_namespace"):
        try:
            _readonly_except(libc, work, iso)
        except OSError as e:
            iso["readonly_fs"] = False
            iso["readonly_errors"] = [str(e)]
    if uid is not None:  # root: hand the directory to a fresh uid, then become it (RLIMIT_NPROC then applies)
        for name in [work] + [os.path.join(work, n) for n in os.listdir(work)]:
            os.chown(name, uid, uid)
    mb = 1024 * 1024
    for res, value in ((resource.RLIMIT_CPU, lim["cpu_s"]), (resource.RLIMIT_AS, lim["memory_mb"] * mb),
                       (resource.RLIMIT_NPROC, lim["max_procs"]), (resource.RLIMIT_FSIZE, lim["max_file_mb"] * mb),
                       (resource.RLIMIT_NOFILE, lim["max_open_files"]), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        iso["unprivileged_uid"] = os.getuid() == uid != 0
    else:
        iso["unprivileged_uid"] = os.getuid() != 0 or bool(iso.get("user_namespace"))
    if not iso.get("net_namespace"):
        with open(os.path.join(work, "main.py"), "r+", encoding="utf-8") as f:
            src = f.read()
            f.seek(0)
            f.write(_NETWORK_GUARD + src)
        iso["network_audit_hook"] = True
    os.chdir(work)
    os.write(cfg["report_fd"], (json.dumps({"isolation": iso}) + "\n").encode())
    os.set_inheritable(cfg["report_fd"], False)  # closed by a successful exec; an exec error is still reported
    env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
    os.execve(python, [python, "-I", "-B", "main.py"], env)


def _runner(cfg: dict) -> int:
    libc = _libc()
    iso: dict = {}
    root = os.geteuid() == 0
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | (0 if root else CLONE_NEWUSER)
    uid, gid = os.getuid(), os.getgid()
    try:
        _check(libc.unshare(flags), "unshare")
        iso.update(mount_namespace=True, net_namespace=True, pid_namespace=True, user_namespace=not root)
    except OSError as e:  # try the namespaces one at a time: keep what the kernel allows
        iso["namespace_error"] = str(e)
        for key, flag in (("user_namespace", 0 if root else CLONE_NEWUSER), ("mount_namespace", CLONE_NEWNS),
                          ("net_namespace", CLONE_NEWNET), ("pid_namespace", CLONE_NEWPID)):
            iso[key] = bool(flag) and libc.unshare(flag) == 0
        if not root and not iso["user_namespace"]:  # the others need the user namespace when not root
            iso.update(mount_namespace=False, net_namespace=False, pid_namespace=False)
    if iso.get("user_namespace"):
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    sandbox_uid = UID_BASE + os.getpid() % (1 << 20) if root else None
    lim = cfg["limits"]
    pid = os.fork()
    if pid == 0:
        try:
            _child(cfg, libc, iso, sandbox_uid)
        except BaseException as e:  # setup (or exec) failed: report it; the program never ran
            os.write(cfg["report_fd"], (json.dumps({"isolation": iso, "setup_error": repr(e)}) + "\n").encode())
        os._exit(126)
    deadline = time.monotonic() + float(lim["timeout_s"])
    timed_out, status = False, 0
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() >= deadline:
            timed_out = True
            os.kill(pid, signal.SIGKILL)  # PID 1 of the namespace: the kernel kills every process inside
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.01)
    code = os.waitstatus_to_exitcode(status)
    os.write(cfg["report_fd"], (json.dumps({"exit": code, "timed_out": timed_out}) + "\n").encode())
    os.close(cfg["report_fd"])
    return 0


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--child":
    sys.exit(_runner(json.loads(sys.argv[2])))
