"""Real gateway processes for the tests, forked from a warm interpreter.

A test that needs `python -m abstractgateway ARGS` (or `python -c CODE`) in a process of its own gets
one forked from a helper interpreter that has already imported the gateway and the modules `serve`
loads: the same code, arguments, environment, working directory and output streams, and a real
process to SIGKILL, SIGSTOP or wait on, without paying the ~0.3 s of CPU each fresh interpreter
spends importing (about a hundred of them per suite run, on two cores).

The helper forks twice, so the new process is re-parented to the test process (a child subreaper),
which therefore waits on it like on any child: exit codes and deaths by signal read the same as
`subprocess.Popen`'s. (So any process orphaned below a test process stays a zombie until it exits,
and what Python reads from the environment only at start-up, such as PYTHONHASHSEED or PYTHONPATH,
is the helper's.) Where that cannot be had (not Linux), or for what the helper cannot carry
(`preexec_fn`), `spawn_gateway` falls back to `subprocess.Popen`. Tests about how a process is
started (nohup, the console script, the .pyz) keep starting real interpreters themselves.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, List, Optional, Sequence

_PR_SET_CHILD_SUBREAPER = 36
_WARM_MODULES = (
    "abstractgateway", "abstractruntime", "abstractruntime.visualflow_compiler", "werkzeug.wrappers",
    "werkzeug.routing", "werkzeug.exceptions", "werkzeug.wsgi", "werkzeug.datastructures", "concurrent.futures",
    "selectors", "queue", "heapq", "zipfile", "mimetypes", "platformdirs", "secrets", "hmac", "email.utils",
)


# --- the helper interpreter ---------------------------------------------------------------------------


def _become(request: dict, fds: List[int]) -> None:
    """In the forked process: take the request's streams, environment and directory, then run it as
    `python -m abstractgateway` or `python -c` would. Its SystemExit ends this interpreter normally."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    os.closerange(3, 1 << 16)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    import abstractgateway

    if request["code"] is None:
        sys.argv = [abstractgateway.__file__, *request["args"]]
        sys.path[0] = os.getcwd()
        sys.exit(abstractgateway.main(request["args"]))
    sys.argv = ["-c", *request["args"]]
    sys.path[0] = ""
    exec(compile(request["code"], "<string>", "exec", dont_inherit=True),  # (not this file's __future__)
         {"__name__": "__main__", "__builtins__": __builtins__})
    sys.exit(0)


def _serve_forks(channel_fd: int) -> None:
    """The helper's loop: one request, one process, until the test process closes the channel."""
    import importlib

    sys.path[0] = os.getcwd()  # the checkout the tests run from, as `python -m` would import it (not ours)
    for name in _WARM_MODULES:
        importlib.import_module(name)
    assert threading.active_count() == 1, "the helper must hold no thread when it forks"
    channel = socket.socket(fileno=channel_fd)
    while True:
        message, fds, _, _ = socket.recv_fds(channel, 1 << 20, 3)
        if not message:
            return
        request = json.loads(message)
        pid_read, pid_write = os.pipe()
        middle = os.fork()
        if middle == 0:  # forks the process and exits at once, leaving it to the test process
            child = os.fork()
            if child == 0:
                os.close(pid_read)
                os.close(pid_write)
                channel.close()
                _become(request, fds)
            os.write(pid_write, str(child).encode())
            os._exit(0)
        os.close(pid_write)
        with os.fdopen(pid_read, "rb") as reader:
            child_pid = int(reader.read())
        os.waitpid(middle, 0)  # re-parented before the test process hears of it
        for fd in fds:
            os.close(fd)
        channel.send(json.dumps({"pid": child_pid}).encode())


# --- the test process's side ----------------------------------------------------------------------------


class WarmProcess:
    """The part of `subprocess.Popen` the tests use, for a process forked by the helper."""

    def __init__(self, args: List[str], pid: int, stdout: Any, stderr: Any) -> None:
        self.args, self.pid, self.stdout, self.stderr = args, pid, stdout, stderr
        self.returncode: Optional[int] = None
        self._wait_lock = threading.Lock()
        self._output: Optional[dict] = None

    def _reap(self, flags: int) -> Optional[int]:
        with self._wait_lock:
            if self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, flags)
                except ChildProcessError:
                    pid, status = self.pid, 0
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

    def poll(self) -> Optional[int]:
        return self._reap(os.WNOHANG)

    def wait(self, timeout: Optional[float] = None) -> int:
        """Polls (a blocking waitpid under the lock would block `poll` and `send_signal` in other threads)."""
        deadline, pause = time.monotonic() + (threading.TIMEOUT_MAX if timeout is None else timeout), 0.0005
        while self._reap(os.WNOHANG) is None:
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: Optional[float] = None):
        """Popen.communicate: reads both pipes to their end, then waits; on a timeout the readers go on,
        and a later call collects what they read."""
        if self._output is None:
            self._output = {}
            for name in ("stdout", "stderr"):
                stream = getattr(self, name)
                if stream is not None:
                    thread = threading.Thread(target=lambda s=stream, n=name: self._output.__setitem__(n, s.read()),
                                              daemon=True)
                    thread.start()
                    self._output[name + "_thread"] = thread
        deadline = None if timeout is None else time.monotonic() + timeout
        for name in ("stdout", "stderr"):
            thread = self._output.get(name + "_thread")
            if thread is not None:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self._output.get("stdout"), self._output.get("stderr")


class _Helper:
    """The helper interpreter of this test process, started on first use."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.channel, self.lock = ours, threading.Lock()
        ours.settimeout(60)
        self.proc = subprocess.Popen([sys.executable, __file__, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        theirs.close()

    def fork(self, request: dict, fds: List[int]) -> int:
        try:
            with self.lock:
                socket.send_fds(self.channel, [json.dumps(request).encode()], fds)
                reply = self.channel.recv(1 << 16)
        except OSError as exc:  # (the channel has a timeout: a stopped helper does not hang the test)
            raise RuntimeError(f"the helper interpreter does not answer ({exc}); its error is on stderr") from None
        if not reply:
            raise RuntimeError("the helper interpreter exited; its error is on stderr")
        return json.loads(reply)["pid"]


_helper: Optional[_Helper] = None
_helper_lock = threading.Lock()


def _subreaper() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _get_helper() -> Optional[_Helper]:
    global _helper
    with _helper_lock:
        if _helper is None and _subreaper():
            _helper = _Helper()
        return _helper


def _stream_ends(spec: Any, fd: int, text: bool, opened: List[int]) -> tuple:
    """(the child's end, our file object or None) for Popen's stdout or stderr value."""
    if spec == subprocess.PIPE:
        ours, theirs = os.pipe()
        opened.append(theirs)
        return theirs, io.open(ours, "r" if text else "rb", encoding="utf-8" if text else None)
    if spec == subprocess.DEVNULL:
        theirs = os.open(os.devnull, os.O_WRONLY)
        opened.append(theirs)
        return theirs, None
    if spec is None:
        return fd, None
    return (spec if isinstance(spec, int) else spec.fileno()), None


def _popen(args: List[str], code: Optional[str], *, env: Optional[dict] = None, stdout: Any = None,
           stderr: Any = None, text: bool = False, **unsupported: Any):
    command = [sys.executable, *(["-m", "abstractgateway"] if code is None else ["-c", code]), *args]
    helper = None if unsupported else _get_helper()
    if helper is None:
        return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, text=text,
                                **unsupported)
    opened: List[int] = []
    try:
        in_fd = os.open(os.devnull, os.O_RDONLY)
        opened.append(in_fd)
        out_fd, out_stream = _stream_ends(stdout, 1, text, opened)
        err_fd, err_stream = _stream_ends(stderr, 2, text, opened)
        request = {"args": [str(a) for a in args], "code": code, "env": dict(os.environ if env is None else env),
                   "cwd": os.getcwd()}
        pid = helper.fork(request, [in_fd, out_fd, err_fd])
    finally:
        for fd in opened:
            os.close(fd)
    return WarmProcess(command, pid, out_stream, err_stream)


def spawn_gateway(args: Sequence[Any], **popen_kwargs: Any):
    """`subprocess.Popen([python, "-m", "abstractgateway", *args], **popen_kwargs)`, forked warm."""
    return _popen(list(args), None, **popen_kwargs)


def spawn_python(code: str, *args: Any, **popen_kwargs: Any):
    """`subprocess.Popen([python, "-c", code, *args], **popen_kwargs)`, forked warm."""
    return _popen([str(a) for a in args], code, **popen_kwargs)


def _run(proc, timeout: Optional[float]) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_gateway(args: Sequence[Any], *, capture_output: bool = False, timeout: Optional[float] = None,
                **popen_kwargs: Any) -> subprocess.CompletedProcess:
    """`subprocess.run([python, "-m", "abstractgateway", *args], ...)`, forked warm; killed on a timeout."""
    if capture_output:
        popen_kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return _run(spawn_gateway(args, **popen_kwargs), timeout)


def run_python(code: str, *args: Any, timeout: Optional[float] = None, **popen_kwargs: Any
               ) -> subprocess.CompletedProcess:
    """`subprocess.run([python, "-c", code, *args], ...)`, forked warm; killed on a timeout."""
    return _run(spawn_python(code, *args, **popen_kwargs), timeout)


if __name__ == "__main__":
    _serve_forks(int(sys.argv[1]))
