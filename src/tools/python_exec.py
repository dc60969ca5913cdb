"""Run model-written Python in a fresh interpreter, with limits, and return what it printed.

Each call: a throwaway temporary directory (the child's cwd, HOME and TMPDIR; deleted afterwards), a
child ``python -I -u -c BOOT PRELUDE`` in its own session, the code sent on stdin, stdout and stderr
redirected to files *outside* that directory, of which the parent reads a bounded head (stdout) and
tail (stderr).

Limits, set by the prelude before the user's code runs (hard and soft, so the code cannot raise them):
``RLIMIT_CPU`` (the CPU-time limit; SIGXCPU), ``RLIMIT_AS`` (memory: an allocation over it is a
``MemoryError``), ``RLIMIT_FSIZE`` (any file, stdout included, stops growing at ``max_file_mb``: a program
printing gigabytes costs the parent nothing), ``RLIMIT_CORE = 0``. The wall-clock limit is the parent's:
``communicate(timeout=...)`` then SIGKILL to the whole process group.

The prelude also installs a ``sys.addaudithook`` hook (CPython's audit events fire from C, so they cover
``builtins.open``, ``io.FileIO``, ``os.open``, ``_socket`` and ``posix``, which monkeypatching
``socket.socket`` or ``builtins.open`` would miss, and a hook cannot be removed once added). It refuses:
writes, deletes, renames, mkdir/chmod outside the working directory (paths resolved through symlinks); reads and
directory listings outside the working directory and the Python installation (``sys.path``, the prefixes, a few
system files such as ``/dev/urandom`` and the time zones), and opening a directory outside it (a descriptor for
``dir_fd=`` paths); changing the working directory; SQLite (files, URIs, ``ATTACH`` and ``VACUUM INTO`` all reach
the disk); every network socket, connection and name lookup; starting processes (``subprocess``, ``os.system``,
``fork``, ``exec*``, and ``_posixsubprocess.fork_exec``, which raises no event and is replaced); signalling other
processes; changing resource limits; looking up any C function through ``ctypes``; importing the C modules that
reach files, shared memory or processes without an audit event (``readline``'s history files, the ``dbm`` and
``curses`` backends, ``pwd``/``grp``, ``_posixshmem``, ``_multiprocessing``, ``syslog``), and importing a fresh
copy of ``posix`` or ``_posixsubprocess`` (which would give back what the prelude removed). ``os.mkfifo`` and
``os.mknod``, which raise no audit event, are removed. The environment is rebuilt from scratch (no proxy
variables, no credentials; ``-I`` ignores ``PYTHON*`` variables and the user site).

Every name the hook calls is bound in its closure (rebinding builtins, ``os.path`` or the prelude's globals does not
change its checks), and the gc's object walks, the way to the hook's function and closure, are refused.

What the hook does not hold: it is a guard against a model's accidents, not a boundary. Code that reaches the
kernel without an audit event (a native extension; a standard-library function that the list above misses) can do
whatever the process may. One such way is known: ``importlib.util.module_from_spec`` on ``posix``'s spec builds a
fresh copy of that built-in module without an ``import`` event, with ``mkfifo`` and ``mknod`` back (a FIFO or an
empty file outside the directory). The boundary, where the machine allows it, is ``isolation``: ``auto`` (the default:
kernel namespaces where ``unshare`` can create them), ``namespaces`` (required) or ``audit`` (the hook only).
The child then runs under ``unshare`` in its own user, network, PID and mount namespaces: it has no network
interface but loopback, and it is PID 1 of its namespace, so every process it starts, detached with ``setsid`` or
not, is killed when it ends or times out. Run as root, it also drops to ``nobody`` (``setpriv``) where ``nobody``
may run the interpreter, so the kernel's file permissions apply; otherwise (an interpreter under ``/root``) it
keeps the calling user's file rights. For untrusted code in production, run the tool in a container, nsjail or
gVisor, as an unprivileged user.

Limits are set in the child rather than in ``preexec_fn``: the ``ToolEnvironment`` runs calls on worker
threads, and CPython documents ``preexec_fn`` as unsafe (it may deadlock) in a threaded parent.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile

from src.tools.base import Tool

_PRELUDE = r'''
import os, sys, resource, signal, socket, traceback, linecache
code = sys.stdin.buffer.read().decode("utf-8", "replace")
sys.stdin = open(os.devnull)
cpu_s, mem_bytes, file_bytes = (int(a) for a in sys.argv[2:5])
resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full file is an OSError, not a silent kill
sys.dont_write_bytecode = True

for _name in ("mkfifo", "mknod"):  # no audit event: removed (a FIFO or device node outside the directory)
    for _mod in (os, sys.modules.get("posix")):
        if _mod is not None and hasattr(_mod, _name):
            delattr(_mod, _name)

def _make_hook(root, pid, af_unix, readable):
    # every name the hook calls is bound here, in its closure: the user's code can rebind builtins, the prelude's
    # globals (``import __main__``) and ``os.path``'s functions, but not these (their function objects are out of
    # reach: the gc's object walks are refused below)
    isinstance_, any_, isdir, sep = isinstance, any, os.path.isdir, os.sep
    realpath, fsdecode = os.path.realpath, os.fsdecode
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    # event -> how many leading arguments are paths it changes
    path_events = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1,
                   "os.utime": 1, "os.truncate": 1, "os.chflags": 1, "os.setxattr": 1, "os.removexattr": 1,
                   "shutil.rmtree": 1, "shutil.chown": 1, "os.rename": 2, "os.link": 2}
    network = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
               "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo"}
    processes = frozenset({"os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "os.fork",
                 "os.forkpty"})
    # extension modules that open files, shared memory or processes from C without an audit event; importing one
    # afresh (``del sys.modules[...]`` first) also gives back what the prelude removed from posix/_posixsubprocess
    unaudited = frozenset({"posix", "_posixsubprocess", "readline", "_dbm", "_gdbm", "_curses", "_curses_panel",
                           "_tkinter", "_posixshmem", "_multiprocessing", "syslog", "nis", "spwd", "grp", "pwd",
                           "_testcapi", "_testinternalcapi", "_xxsubinterpreters", "_xxinterpchannels"})
    # reaching the hook's own function object (and so its closure) goes through the gc's object walks
    introspection = frozenset({"gc.get_objects", "gc.get_referrers", "gc.get_referents"})

    def resolved(path):
        try:
            return realpath(fsdecode(path))
        except Exception:
            return None

    def under(real, top):
        return real is not None and (real == top or real.startswith(top.rstrip(sep) + sep))

    def inside(path):
        return isinstance_(path, int) or under(resolved(path), root)  # an int: an already-open descriptor

    def refuse_write(path):
        if not inside(path):
            raise PermissionError(f"sandbox: writing outside the working directory is not allowed: {path}")

    def refuse_read(path):
        """Refuse a path outside the working directory and the readable places; the resolved path when it is
        outside the working directory (None: inside, or a descriptor)."""
        if isinstance_(path, int) or path is None:
            return None
        real = resolved(path)
        if under(real, root):
            return None
        if not any_(under(real, r) for r in readable):
            raise PermissionError(f"sandbox: reading outside the working directory and the Python installation "
                                  f"is not allowed: {path}")
        return real

    def hook(event, args):
        if event == "import" and args[0] in unaudited:
            # an ImportError: the standard library's optional imports (shutil's pwd, for one) do without it
            raise ImportError(f"sandbox: importing {args[0]} is not allowed (it reaches files or processes "
                              f"without an audit event)")
        if event in introspection:
            raise PermissionError("sandbox: walking the interpreter's objects through gc is not allowed")
        if event == "open":
            path, mode, flags = args
            if (isinstance_(mode, str) and any_(c in mode for c in "wax+")) or (flags or 0) & write_flags:
                refuse_write(path)
            else:
                outside = refuse_read(path)
                # a directory descriptor outside would let dir_fd= paths escape the checks above
                if outside is not None and isdir(outside):
                    raise PermissionError(f"sandbox: opening a directory outside the working directory is not "
                                          f"allowed: {path}")
        elif event in ("os.listdir", "os.scandir"):
            refuse_read(args[0] if args else ".")
        elif event == "sqlite3.connect":  # a file, a URI, or ATTACH / VACUUM INTO from memory all reach the disk
            raise PermissionError("sandbox: SQLite is not available")
        elif event in ("ctypes.dlsym", "ctypes.dlsym/handle"):
            raise PermissionError("sandbox: calling C functions through ctypes is not allowed")
        elif event == "os.chdir":
            raise PermissionError("sandbox: changing the working directory is not allowed")
        elif event in path_events:
            for path in args[: path_events[event]]:
                refuse_write(path)
        elif event == "os.symlink":
            refuse_write(args[1])
        elif event in network or (event == "socket.__new__" and args[1] != af_unix):
            raise PermissionError("sandbox: network access is disabled")
        elif event in processes:
            raise PermissionError("sandbox: starting processes is disabled")
        elif event in ("os.kill", "os.killpg") and args[0] not in (pid, 0):
            raise PermissionError("sandbox: signalling other processes is disabled")
        elif event in ("resource.setrlimit", "resource.prlimit"):
            raise PermissionError("sandbox: resource limits cannot be changed")
    return hook

linecache.cache["<tool>"] = (len(code), None, code.splitlines(True), "<tool>")
try:
    compiled = compile(code, "<tool>", "exec")
except (SyntaxError, ValueError) as e:  # ValueError: a null byte in the source
    traceback.print_exception(type(e), e, None)
    sys.exit(1)
_readable = {os.path.realpath(p) for p in sys.path if p} | {os.path.realpath(p) for p in (
    sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)} | {
    "/dev/null", "/dev/urandom", "/dev/random", "/dev/zero", "/usr/share/zoneinfo", "/etc/localtime",
    "/usr/lib/locale", "/proc/self", "/proc/cpuinfo", "/proc/meminfo", "/sys/devices/system/cpu",
    os.path.realpath(os.path.dirname(sys.executable))}
import _posixsubprocess

def _no_processes(*args, **kwargs):
    raise PermissionError("sandbox: starting processes is disabled")

_posixsubprocess.fork_exec = _no_processes  # subprocess's way past the audit events
sys.addaudithook(_make_hook(os.path.realpath(os.getcwd()), os.getpid(), socket.AF_UNIX, sorted(_readable)))
del _readable, _no_processes
del _make_hook
sys.argv = ["<tool>"]
try:
    exec(compiled, {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit:
    raise
except BaseException as e:  # the traceback without the prelude's and the audit hook's frames
    report = traceback.TracebackException(type(e), e, e.__traceback__)
    part = report
    while part is not None:
        part.stack[:] = [frame for frame in part.stack if frame.filename != "<sandbox>"]
        part = part.__cause__ or part.__context__
    sys.stderr.write("".join(report.format()))
    sys.exit(1)
'''
# the prelude is compiled under its own file name, so its frames can be told from the user's
_BOOT = "import sys; exec(compile(sys.argv[1], '<sandbox>', 'exec'))"


ISOLATION = ("auto", "namespaces", "audit")
# no network at all, a PID namespace whose processes all die with its first (setsid or not), a private /proc
UNSHARE = ("unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child", "--mount",
           "--mount-proc")


# as root, the child also drops to this uid/gid outside the namespaces, so the kernel's file permissions hold
NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


def _works(command: list[str]) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=20, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@functools.cache
def namespaces_available() -> bool:
    """Whether ``unshare`` can create the namespaces of ``isolation=namespaces`` on this machine."""
    return shutil.which("unshare") is not None and _works([*UNSHARE, "true"])


@functools.cache
def namespace_prefix(python: str) -> tuple[str, ...]:
    """The command that runs ``python`` in its namespaces: as the unprivileged ``nobody`` where the process is root
    and ``nobody`` may run that interpreter, else as the calling user (mapped to root inside, no more rights)."""
    if os.geteuid() == 0 and shutil.which("setpriv") and _works([*NOBODY, *UNSHARE, python, "-I", "-c", "pass"]):
        return (*NOBODY, *UNSHARE)
    return UNSHARE


def _read_head(path: str, max_chars: int) -> tuple[str, int, bool]:
    """The first ``max_chars`` characters of a file (reading at most 4 bytes a character), its size in
    bytes, and whether that is not all of it."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        data = f.read(4 * max_chars)
    text = data.decode("utf-8", "replace")
    return text[:max_chars], size, len(data) < size or len(text) > max_chars


def _read_tail(path: str, max_chars: int) -> tuple[str, int, bool]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(0, size - 4 * max_chars))
        data = f.read()
    text = data.decode("utf-8", "replace")
    return (text[-max_chars:] if max_chars else ""), size, len(data) < size or len(text) > max_chars


class PythonTool(Tool):
    """Executes a Python program and returns its stdout (with stderr when it fails).

    Args:
        timeout_s: wall-clock limit; the CPU-time limit is its ceiling. Keep it below the environment's.
        memory_mb: address-space limit of the child (the interpreter itself takes about 20 MB).
        max_output_chars: characters of output returned; the rest is cut with a note.
        max_file_mb: largest file the child may write, stdout and stderr included.
        python: interpreter to run (default: this one, so the venv's packages are importable).
        isolation: ``auto`` (kernel namespaces where ``unshare`` can create them, else the audit hook only),
            ``namespaces`` (required; an error where unavailable) or ``audit`` (see the module docstring).
    """

    name = "python"
    description = ("Run a Python 3 program and return what it prints. Each call starts a fresh interpreter "
                   "in an empty temporary directory, so print() every result you need. No network access.")
    parameters = {
        "type": "object",
        "properties": {"code": {"type": "string", "description": "the complete program to run"}},
        "required": ["code"],
    }

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 1024, max_output_chars: int = 4000,
                 max_file_mb: int = 16, python: str | None = None, isolation: str = "auto"):
        if isolation not in ISOLATION:
            raise ValueError(f"tools python isolation must be one of {ISOLATION}, got {isolation!r}")
        if isolation == "namespaces" and not namespaces_available():
            raise RuntimeError("tools python isolation=namespaces: `unshare` cannot create user, network and PID "
                               "namespaces here (not installed, or unprivileged user namespaces are disabled); "
                               "use isolation=auto or =audit")
        self.timeout_s, self.memory_mb, self.max_output_chars = timeout_s, memory_mb, max_output_chars
        self.max_file_mb, self.python = max_file_mb, python or sys.executable
        self.isolation = isolation
        self.namespaces = isolation == "namespaces" or (isolation == "auto" and namespaces_available())

    def run(self, code: str) -> str:
        with tempfile.TemporaryDirectory(prefix="reopold-python-", ignore_cleanup_errors=True) as root:
            work = os.path.join(root, "work")
            os.mkdir(work)
            out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
                   "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                   "MKL_NUM_THREADS": "1"}
            limits = [str(math.ceil(self.timeout_s)), str(self.memory_mb << 20), str(self.max_file_mb << 20)]
            timed_out = False
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                command = [self.python, "-I", "-u", "-c", _BOOT, _PRELUDE, *limits]
                if self.namespaces:
                    os.chmod(root, 0o755)  # nobody (as root, the child runs as nobody) must reach its directory
                    os.chmod(work, 0o777)
                    command = [*namespace_prefix(self.python), *command]
                proc = subprocess.Popen(command,
                                        stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=work, env=env,
                                        start_new_session=True, close_fds=True)
                try:
                    proc.communicate(code.encode("utf-8", "replace"), timeout=self.timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    try:  # the whole group, before the leader is reaped, so the group id cannot be reused
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait()
            return self._format(proc.returncode, timed_out, out_path, err_path)

    def _format(self, returncode: int, timed_out: bool, out_path: str, err_path: str) -> str:
        if timed_out:
            header = f"error: timed out after {self.timeout_s:g}s (wall clock)"
        elif returncode == -signal.SIGXCPU:
            header = f"error: CPU time limit of {math.ceil(self.timeout_s)}s exceeded"
        elif returncode < 0:
            number = -returncode
            name = signal.Signals(number).name if number in signal.valid_signals() else f"signal {number}"
            hint = " (memory limit?)" if name in ("SIGKILL", "SIGSEGV") else ""
            header = f"error: killed by {name}{hint}"
        elif returncode > 0:
            header = f"error: exit code {returncode}"
        else:
            header = ""
        budget = self.max_output_chars
        stderr = ""
        if header:  # the traceback's end says what went wrong: keep up to half the budget for it
            stderr, _, cut = _read_tail(err_path, budget // 2)
            stderr = "... " + stderr if cut else stderr
        stdout, out_size, cut = _read_head(out_path, budget - len(stderr))
        if cut:
            stdout += f"\n... [output truncated: {out_size} bytes in all]"
        if not header:
            return stdout.rstrip("\n") if stdout.strip() else "(no output; print() the values you need)"
        return "\n".join(part.rstrip("\n") for part in (header, stdout, stderr) if part.strip())
