"""Servers the remote-data tests and benchmarks/loader.py start on 127.0.0.1, all real:

- `http_server(root)`: Python's own HTTP server (`python -m http.server`) serving a folder;
- `s3_server()`: moto's standalone S3-compatible server (`moto_server`), spoken to through s3fs with
  `AWS_ENDPOINT_URL` and throwaway credentials (`S3_ENV`);
- `FaultProxy(upstream)`: an HTTP proxy in front of either that adds latency per request, caps the
  bandwidth of everything it serves, answers 503 on a schedule and resets connections mid-body.

The first two run as child processes; the proxy runs in a thread here, or as its own process:

    python tests/servers.py proxy --upstream http://127.0.0.1:8000 --latency-ms 50 --mbps 50
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import http.server
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

from ports import free_port

BIN = Path(sys.executable).parent
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",  # moto takes any; these are no one's credentials
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not come up in {timeout} s")


@contextmanager
def _child(args: list[str], url: str, **kwargs) -> Iterator[None]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    try:
        _wait_until_up(url, proc)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextmanager
def http_server(
    root: str | os.PathLike, *, token: str | None = None, ranges: bool = False, if_range: bool = True
) -> Iterator[str]:
    """`root` served over HTTP: yields its base URL. Python's own file server, which ignores `Range`;
    with `ranges`, one that answers `Range: bytes=N-` with 206 from byte N, sends an ETag (the file's
    digest) and honours `If-Range` (a stale validator gets the whole new object, 200; not with
    `if_range=False`, a server that sends the rest of whatever it has); with `token`, a
    request without the header `Authorization: Bearer <token>` is answered 401 (the token reaches the
    server by its environment)."""
    port = free_port()
    if token is None and not ranges:
        args = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)]
        env = None
    else:
        args = [sys.executable, __file__, "http", "--root", str(root), "--port", str(port)]
        args += ["--ranges"] if ranges else []
        args += [] if if_range else ["--no-if-range"]
        env = {**os.environ, "SERVE_TOKEN": token or ""}
    with _child(args, f"http://127.0.0.1:{port}/", env=env):
        yield f"http://127.0.0.1:{port}"


def serve(root: str, port: int, token: str, ranges: bool, if_range: bool = True) -> None:
    """Python's file server, answering only requests that carry the bearer token (if one is given)
    and, with `ranges`, a `Range: bytes=N-` request with 206 and the bytes from N on."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=root, **kwargs)

        def log_message(self, *args) -> None:
            pass

        def _authorized(self) -> bool:
            if not token or self.headers.get("Authorization") == f"Bearer {token}":
                return True
            self.send_error(401, "a bearer token is needed")
            return False

        def do_GET(self) -> None:
            if not self._authorized():
                return
            found = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            path = Path(self.translate_path(self.path))
            if not ranges or not path.is_file():
                return super().do_GET()
            data = path.read_bytes()
            etag = '"' + hashlib.sha1(data).hexdigest() + '"'
            stale = if_range and self.headers.get("If-Range", etag) != etag
            if not found or stale:  # the whole (current) object
                self.send_response(200)
                self.send_header("Content-Type", "application/x-tar")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", etag)
                self.end_headers()
                self.wfile.write(data)
                return
            start = int(found.group(1))
            if start >= len(data):
                return self.send_error(416, "range not satisfiable")
            self.send_response(206)
            self.send_header("Content-Type", "application/x-tar")
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("ETag", etag)
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            self.wfile.write(data[start:])

        def do_HEAD(self) -> None:
            if self._authorized():
                super().do_HEAD()

    http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


@contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server: yields its endpoint URL. Talk to it with `S3_ENV` and AWS_ENDPOINT_URL set."""
    port = free_port()
    with _child([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], f"http://127.0.0.1:{port}/"):
        yield f"http://127.0.0.1:{port}"


def s3_env(endpoint: str) -> dict[str, str]:
    return {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}


@contextmanager
def gcs_server() -> Iterator[str]:
    """gcp-storage-emulator's Cloud Storage server (in memory): yields its endpoint URL; gcsfs finds it
    through `gcs_env`."""
    port = free_port()
    args = [str(BIN / "gcp-storage-emulator"), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"]
    with _child(args, f"http://127.0.0.1:{port}/"):
        yield f"http://127.0.0.1:{port}"


def gcs_env(endpoint: str) -> dict[str, str]:
    # gcsfs's default filesystem first asks the bucket's type over gRPC, which the emulator does not
    # serve (a minute's timeout per bucket); the plain JSON-API filesystem is what it speaks.
    return {"STORAGE_EMULATOR_HOST": endpoint, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def upload(local: str | os.PathLike, url: str, endpoint: str) -> None:
    """A local folder to `s3://bucket/prefix` or `gs://bucket/prefix` on the server at `endpoint`
    (the bucket made if new). For gs://, `gcs_env(endpoint)` must be in the environment."""
    if url.startswith("gs://"):
        import gcsfs

        fs = gcsfs.GCSFileSystem(token="anon", project="test")
    else:
        import s3fs

        fs = s3fs.S3FileSystem(
            key=S3_ENV["AWS_ACCESS_KEY_ID"], secret=S3_ENV["AWS_SECRET_ACCESS_KEY"], endpoint_url=endpoint
        )
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    fs.put(str(local), url.rstrip("/"), recursive=True)


ERRORS = {  # what the proxy answers instead of forwarding: S3's own error bodies
    "503": (503, b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"),
    "403": (403, b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"),
}


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """A client that drops a connection (as a reset reader does) is no error of the proxy's."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class FaultProxy:
    """Forwards every request to `upstream`. Each request waits `latency` seconds first; all bodies
    together are sent at most `bandwidth` bytes/s. GETs of `.tar` objects are numbered from 1: the
    `error_every`-th ones are answered 503 (S3's SlowDown), the `reset_every`-th ones are cut after
    half their body with a TCP reset (at most `max_resets` of them, `on_reset` called after each); a
    request whose "METHOD path" matches `deny` (a regex) is answered 403 AccessDenied, which no client
    retries. Counters of what it did are in `served`."""

    def __init__(
        self,
        upstream: str,
        *,
        latency: float = 0.0,
        bandwidth: float = 0.0,
        error_every: int = 0,
        reset_every: int = 0,
        deny: str | None = None,
        port: int = 0,
        max_resets: int | None = None,
        on_reset: Callable[[], None] = lambda: None,
    ):
        self.upstream = urlsplit(upstream)
        self.latency, self.bandwidth = latency, bandwidth
        self.error_every, self.reset_every = error_every, reset_every
        self.deny = re.compile(deny) if deny else None
        self.max_resets, self.on_reset = max_resets, on_reset
        self.served = {"requests": 0, "tar_gets": 0, "errors_503": 0, "resets": 0, "bytes": 0, "denied": 0}
        self.gets: Counter = Counter()  # the access log: GETs per path
        self._lock = threading.Lock()
        self._next_free = 0.0  # when the capped link is free again
        self._server = _QuietServer(("127.0.0.1", port), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _throttle(self, n: int) -> None:
        if not self.bandwidth:
            return
        with self._lock:
            now = time.monotonic()
            self._next_free = max(now, self._next_free) + n / self.bandwidth
            wait = self._next_free - now
        time.sleep(wait)

    def _fault(self, method: str, path: str) -> str | None:
        with self._lock:
            self.served["requests"] += 1
            if self.deny is not None and self.deny.search(f"{method} {path}"):
                self.served["denied"] += 1
                return "403"
            if method == "GET":
                self.gets[urlsplit(path).path] += 1
            if method != "GET" or not urlsplit(path).path.endswith(".tar"):
                return None
            self.served["tar_gets"] += 1
            n = self.served["tar_gets"]
            if self.error_every and n % self.error_every == 0:
                self.served["errors_503"] += 1
                return "503"
            below = self.max_resets is None or self.served["resets"] < self.max_resets
            if self.reset_every and n % self.reset_every == 0 and below:
                self.served["resets"] += 1
                return "reset"
        return None

    def _handler(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                if proxy.latency:
                    time.sleep(proxy.latency)
                fault = proxy._fault(self.command, self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if fault in ("503", "403"):
                    code, message = ERRORS[fault]
                    self.send_response(code)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(message)))
                    self.end_headers()
                    self.wfile.write(message)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                self.send_response(response.status, response.reason)
                for k, v in response.getheaders():
                    if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "server", "date"):
                        self.send_header(k, v)
                size = response.getheader("Content-Length")
                chunked = size is None and self.command != "HEAD"
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                cut = int(size) // 2 if fault == "reset" and size else None
                sent = 0
                while self.command != "HEAD":
                    data = response.read(1 << 16)
                    if not data:
                        break
                    if cut is not None and sent + len(data) >= cut:
                        self.wfile.write(data[: cut - sent])
                        with proxy._lock:
                            proxy.served["bytes"] += cut - sent
                        self.wfile.flush()
                        # SO_LINGER 0: close with a TCP reset, as a dropped connection reads
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.close_connection = True
                        self.connection.close()
                        conn.close()
                        proxy.on_reset()
                        return
                    proxy._throttle(len(data))
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                    sent += len(data)
                    with proxy._lock:
                        proxy.served["bytes"] += len(data)
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")
                conn.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        return Handler


def main() -> None:
    p = argparse.ArgumentParser(description="run the fault proxy (or a token-checking file server) until killed")
    p.add_argument("command", choices=["proxy", "http"])
    p.add_argument("--upstream")
    p.add_argument("--root", help="http: the folder to serve (a token to require: $SERVE_TOKEN)")
    p.add_argument("--ranges", action="store_true", help="http: answer Range requests")
    p.add_argument("--no-if-range", action="store_true", help="http: ignore If-Range")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--mbps", type=float, default=0.0, help="megabytes per second, all bodies together")
    p.add_argument("--error-every", type=int, default=0)
    p.add_argument("--reset-every", type=int, default=0)
    args = p.parse_args()
    if args.command == "http":
        serve(args.root, args.port, os.environ.get("SERVE_TOKEN", ""), args.ranges, not args.no_if_range)
        return
    proxy = FaultProxy(
        args.upstream,
        latency=args.latency_ms / 1000,
        bandwidth=args.mbps * 1e6,
        error_every=args.error_every,
        reset_every=args.reset_every,
        port=args.port,
    )
    with proxy:
        print(proxy.url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
