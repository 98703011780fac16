"""A warm start for the suite's command-line runs: one process imports what every contrastive-* tool
imports (torch, open_clip, DeepSpeed, Hydra, ...: ~8 s), then forks a child for each run, which
starts where a fresh process would after its imports. Each child is a process of its own (its own
pid, memory, signals, exit status, stdin/stdout/stderr), so the tests see what they would see of a
fresh process; only the import time is gone.

    python tests/zygote.py serve SOCKET                 the server (tests/conftest.py starts one a session)
    python tests/zygote.py run contrastive-train ARGS   a client: runs the tool in a forked child, passes
                                                        its signals on, and exits with its status

The client sends its argv, environment, working directory and its stdin/stdout/stderr (as file
descriptors, over the Unix socket) and stands in for the child: a signal it receives is sent to the
child, and when the client dies (a test's timeout kills it) the server kills the child. Without a
server (CONTRASTIVE_ZYGOTE unset), or when the run's environment sets what a library reads at import
(FRESH_ONLY), the client executes the tool itself, as a plain process.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import struct
import sys

# environment a library reads when it is imported: a run that sets it needs a fresh process
FRESH_ONLY = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH_LOGS", "MPLBACKEND", "PYTHONHASHSEED")
PRELOAD = (
    "torch",
    "numpy",
    "PIL.Image",
    "soundfile",
    "open_clip",
    "deepspeed",
    "hydra",
    "webdataset",
    "matplotlib.pyplot",
    "contrastive.cli.train",
    "contrastive.cli.evaluate",
    "contrastive.cli.export",
    "contrastive.cli.embed",
    "contrastive.data_tools.cli",
    "contrastive.training",
)
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)


def _send(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    payload = json.dumps(message).encode()
    data = struct.pack("!I", len(payload)) + payload
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
    else:
        sock.sendall(data)


def _receive(sock: socket.socket) -> tuple[dict | None, list[int]]:
    """(a message, the file descriptors that came with it); (None, []) when the peer closed."""
    head, ancillary, _, _ = sock.recvmsg(4, socket.CMSG_SPACE(3 * 4))
    if len(head) < 4:
        return None, []
    fds = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += struct.unpack(f"{len(data) // 4}i", data[: len(data) // 4 * 4])
    size, payload = struct.unpack("!I", head)[0], b""
    while len(payload) < size:
        chunk = sock.recv(size - len(payload))
        if not chunk:
            return None, fds
        payload += chunk
    return json.loads(payload), fds


# -- the server ---------------------------------------------------------------------------------------


def _child(request: dict, fds: list[int], inherited: list) -> None:
    """In the forked child: become the tool's process, run it, exit with its status."""
    signal.set_wakeup_fd(-1)
    for sig in (*SIGNALS, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL if sig != signal.SIGPIPE else signal.SIG_IGN)
    for thing in inherited:  # the server's sockets and pipes are not the tool's
        thing.close() if hasattr(thing, "close") else os.close(thing)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = [p for p in extra if p not in sys.path]
    sys.argv = request["argv"]
    _stdio(unbuffered=bool(os.environ.get("PYTHONUNBUFFERED")))
    import random

    import numpy as np
    import torch

    seed = int.from_bytes(os.urandom(8), "little")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.seed()  # a fresh process's generators differ from run to run
    code = 1
    try:
        from importlib.metadata import entry_points

        (point,) = [p for p in entry_points(group="console_scripts") if p.name == request["tool"]]
        result = point.load()()
        code = result if isinstance(result, int) else 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - as the interpreter would: the traceback, then status 1
        import traceback

        traceback.print_exc()
    finally:
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if 0 <= code < 256 else 1)


def _stdio(unbuffered: bool) -> None:
    """sys.stdout and sys.stderr on the client's descriptors, buffered as a fresh interpreter would
    buffer them with this environment (PYTHONUNBUFFERED)."""
    import io

    for fd, name in ((1, "stdout"), (2, "stderr")):
        raw = io.FileIO(fd, "w", closefd=False)
        line = unbuffered or fd == 2 or raw.isatty()
        stream = io.TextIOWrapper(raw if unbuffered else io.BufferedWriter(raw), line_buffering=line,
                                  write_through=unbuffered, encoding="utf-8", errors="backslashreplace")  # fmt: skip
        setattr(sys, name, stream)


def serve(path: str) -> None:
    for name in PRELOAD:
        __import__(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(wake_r, selectors.EVENT_READ, "children")
    clients: dict[int, socket.socket] = {}  # child pid -> its client's connection
    print("ready", flush=True)
    parent = os.getppid()

    def forget(pid: int, status: dict | None = None) -> None:
        """The child's client told its status (if it is still there) and let go."""
        conn = clients.pop(pid, None)
        if conn is None:
            return
        selector.unregister(conn)
        try:
            if status is not None:
                _send(conn, status)
        except OSError:
            pass
        conn.close()

    while os.getppid() == parent:  # the suite that started it gone (killed): so is it
        for key, _ in selector.select(timeout=5):
            if key.data == "accept":
                conn, _ = listener.accept()
                try:
                    request, fds = _receive(conn)
                except OSError:
                    request, fds = None, []
                if request is None:
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    _child(request, fds, [listener, conn, wake_r, wake_w, *clients.values()])
                for fd in fds:
                    os.close(fd)
                clients[pid] = conn
                selector.register(conn, selectors.EVENT_READ, pid)
                try:
                    _send(conn, {"pid": pid})
                except OSError:  # the client is gone already: so is its child
                    os.kill(pid, signal.SIGKILL)
            elif key.data == "children":
                os.read(wake_r, 4096)
                while True:
                    try:
                        pid, status = os.waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if pid == 0:
                        break
                    forget(pid, {"status": os.waitstatus_to_exitcode(status)})
            else:  # a client's connection readable: it went away, so does its child
                try:
                    os.kill(key.data, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                forget(key.data)


# -- the client ---------------------------------------------------------------------------------------


def run(tool: str, args: list[str]) -> None:
    path = os.environ.get("CONTRASTIVE_ZYGOTE")
    fresh = [k for k in os.environ if k.startswith(FRESH_ONLY)]
    script = os.path.join(os.path.dirname(sys.executable), tool)
    started = None
    if path and os.path.exists(path) and not fresh:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {k: v for k, v in os.environ.items() if k != "CONTRASTIVE_ZYGOTE"}
        try:
            sock.connect(path)
            _send(sock, {"tool": tool, "argv": [script, *args], "env": env, "cwd": os.getcwd()}, [0, 1, 2])
            started, _ = _receive(sock)
        except OSError:  # no server there (any more): a plain process
            started = None
    if started is None:
        os.execv(script, [script, *args])
    pid = started["pid"]
    for sig in SIGNALS:
        signal.signal(sig, lambda number, _, pid=pid: os.kill(pid, number))
    while True:
        try:
            done, _ = _receive(sock)
            break
        except InterruptedError:
            continue
    code = done["status"] if done else 1
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    # the DeepSpeed launcher puts --local_rank=N first (the rank is in LOCAL_RANK too)
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    if argv[0] == "serve":
        serve(argv[1])
    else:
        run(argv[1], argv[2:])
