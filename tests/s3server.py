"""A real S3-compatible server (moto's server mode) on 127.0.0.1 for the download tests.

``LocalS3()`` runs in a thread of this process (tests); ``LocalS3(own_process=True)`` in a
process of its own (benchmarks, so that the server and the clients measured do not share
one interpreter). ``Proxy`` forwards a port to it and can slow the traffic down or cut
every connection at once, as a server that dies mid-fetch does.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalS3:
    def __init__(self, own_process: bool = False):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = None
        self.server = None
        if not own_process:
            from moto.server import ThreadedMotoServer

            self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    def start(self) -> "LocalS3":
        if self.server is not None:
            self.server.start()
            return self
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("moto server did not start")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")

    def public_bucket(self, bucket: str) -> None:
        """Like the CellMap bucket: anyone may list and read, without credentials."""
        client = self.client()
        client.create_bucket(Bucket=bucket, ACL="public-read")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}],
        }
        client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))

    def upload_tree(self, bucket: str, root: Path, prefix: str, skip=lambda relative: False) -> int:
        """Upload every file under ``root`` to ``prefix`` (except where ``skip(relative path)``)."""
        client = self.client()
        files = [p for p in sorted(Path(root).rglob("*")) if p.is_file() and not skip(p.relative_to(root).as_posix())]

        def put(path: Path) -> None:
            key = f"{prefix}/{path.relative_to(root).as_posix()}"
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes(), ACL="public-read")

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, files))
        return len(files)


class Proxy:
    """TCP forwarder 127.0.0.1:port -> target; ``delay`` seconds after each 64 KiB sent
    back slows downloads; ``cut()`` closes the listener and every connection."""

    def __init__(self, target_port: int, delay: float = 0.0):
        self.target_port = target_port
        self.delay = delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.open:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self.lock:
                if not self.open:
                    client.close()
                    upstream.close()
                    return
                self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, 0.0), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self.delay), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, delay: float) -> None:
        try:
            with contextlib.suppress(OSError):  # either side closed: this direction ends
                while block := source.recv(65536):
                    sink.sendall(block)
                    if delay:
                        time.sleep(delay)
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        with self.lock:
            self.open = False
            self.listener.close()
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
                except OSError:
                    pass
