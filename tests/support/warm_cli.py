"""A warm `python -m broker` for the test harness.

The suite makes over a thousand CLI calls, and an interpreter start with the CLI's imports
costs about 55 ms of CPU each. So each test worker keeps one interpreter that has imported
`broker.cli.main` (what `python -m broker` imports before it runs a command), and forks it
for every call. A call is still its own process, with the test's argv, environment,
working directory and standard streams, and it ends through the interpreter's normal exit,
as `python -m broker` does; only the interpreter start is shared.

Calls whose environment changes how Python itself starts (a `PYTHON*` variable) run cold,
and tests that signal, time or kill the CLI start `sys.executable -m broker` themselves.
"""

from __future__ import annotations

import atexit
import json
import locale
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from broker.cli.main import main

ARGV0 = [sys.executable, "-m", "broker"]


# --- the warm interpreter (run as `python -m tests.support.warm_cli SOCKET`) ---------------


def serve(path: str) -> None:
    """Accept calls forever; each is handled in a fork, so calls run side by side."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers are reaped by the kernel
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _handle(conn)  # never returns: the command raises SystemExit, its handler _exits
        conn.close()


def _handle(conn: socket.socket) -> None:
    """Fork the command with the caller's streams, report its pid, then its exit status."""
    message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    call = json.loads(message)
    pid = os.fork()
    if pid == 0:
        conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(call["cwd"])
        os.environ.clear()
        os.environ.update(call["env"])
        sys.argv = [ARGV0[0], *call["args"]]
        raise SystemExit(main(call["args"]))  # unwinds to the interpreter's own exit
    for fd in fds:
        os.close(fd)
    conn.send(str(pid).encode())
    _, status = os.waitpid(pid, 0)
    conn.send(str(os.waitstatus_to_exitcode(status)).encode())
    os._exit(0)


# --- the harness's side --------------------------------------------------------------------


_server: tuple[subprocess.Popen[str], str] | None = None


def _socket_path() -> str:
    """The warm interpreter's socket, started on first use and stopped at exit."""
    global _server
    if _server is None:
        folder = tempfile.mkdtemp(prefix="sbw-", dir="/tmp")
        path = os.path.join(folder, "s")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SECRET_BROKER_")}
        proc = subprocess.Popen([sys.executable, "-m", "tests.support.warm_cli", path],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                                env=env, cwd=Path(__file__).parents[2])
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        atexit.register(proc.kill)
        _server = proc, path
    return _server[1]


def _python_vars(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("PYTHON")}


def cold(args: tuple[str, ...], *, input: str | None, env: dict[str, str], timeout: float
         ) -> subprocess.CompletedProcess[str]:
    """`python -m broker` in a fresh interpreter, as a user's shell starts it."""
    return subprocess.run([*ARGV0, *args], input=input, capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)


def run(args: tuple[str, ...], *, input: str | None, env: dict[str, str], timeout: float
        ) -> subprocess.CompletedProcess[str]:
    """What `cold` returns, from a fork of the warm interpreter."""
    if _python_vars(env) != _python_vars(os.environ):
        return cold(args, input=input, env=env, timeout=timeout)
    encoding = locale.getpreferredencoding(False)
    with (_stdin(input, encoding) as stdin, tempfile.TemporaryFile() as stdout,
          tempfile.TemporaryFile() as stderr,
          socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn):
        conn.settimeout(timeout)
        conn.connect(_socket_path())
        call = {"args": list(args), "env": env, "cwd": os.getcwd()}
        socket.send_fds(conn, [json.dumps(call).encode()],
                        [stdin.fileno(), stdout.fileno(), stderr.fileno()])
        pid = int(conn.recv(64))
        try:
            code = int(conn.recv(64))
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            raise subprocess.TimeoutExpired([*ARGV0, *args], timeout) from None
        out, err = _text(stdout, encoding), _text(stderr, encoding)
    return subprocess.CompletedProcess([*ARGV0, *args], code, out, err)


def _stdin(input: str | None, encoding: str) -> IO[bytes]:
    """The command's standard input: /dev/null when there is none, as `cold` gives it."""
    if input is None:
        return open(os.devnull, "rb")
    f = tempfile.TemporaryFile()  # noqa: SIM115 - the caller's `with` closes it
    f.write(input.encode(encoding))
    f.seek(0)
    return f


def _text(f: IO[bytes], encoding: str) -> str:
    """As `text=True` reads a pipe: decoded, with universal newlines."""
    f.seek(0)
    return f.read().decode(encoding).replace("\r\n", "\n").replace("\r", "\n")


if __name__ == "__main__":
    serve(sys.argv[1])
