"""brcd_dist.storage against local files and a real S3-compatible store (SeaweedFS on 127.0.0.1, see
tests/object_store.py): the same calls for every location, atomic writes, and reads that survive a link that
cuts every connection."""

from __future__ import annotations

import hashlib
import http.server
import os
import sys
import threading
import uuid

import pytest
from conftest import REPO
from object_store import through_proxy

from brcd_dist import storage


def _key(store, name: str) -> str:
    return store.url("test_storage", uuid.uuid4().hex[:8], name)


def test_local_write_read_list_size(tmp_path):
    uri = str(tmp_path / "sub" / "a.bin")
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    assert storage.size(uri) == 5 and storage.exists(uri) and storage.is_file(uri)
    assert storage.listdir(str(tmp_path / "sub")) == ["a.bin"]


def test_local_write_that_fails_leaves_nothing(tmp_path):
    uri = str(tmp_path / "a.bin")
    with pytest.raises(RuntimeError), storage.open_write(uri) as f:
        f.write(b"half")
        raise RuntimeError("writer died")
    assert os.listdir(tmp_path) == []


def test_s3_write_read_list_size(object_store):
    uri = _key(object_store, "a.bin")
    data = os.urandom(300_000)
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data
    assert storage.size(uri) == len(data) and storage.is_file(uri)
    folder = uri.rsplit("/", 1)[0]
    assert storage.listdir(folder) == ["a.bin"]
    assert not storage.exists(storage.join(folder, "other.bin"))


def test_s3_write_that_fails_uploads_nothing(object_store):
    uri = _key(object_store, "a.bin")
    with pytest.raises(RuntimeError), storage.open_write(uri) as f:
        f.write(b"half")
        raise RuntimeError("writer died")
    assert not storage.exists(uri)


def test_read_through_a_link_that_cuts_every_connection_gives_every_byte_once(object_store):
    uri = _key(object_store, "big.bin")
    data = os.urandom(1_500_000)
    storage.write_bytes(uri, data)
    with through_proxy(object_store, cut_after=120_000) as proxy:
        with storage.open_read(uri, sha256=hashlib.sha256(data).hexdigest()) as f:
            got = f.read()
    assert proxy.cuts >= len(data) // 120_000  # the link really was cut, many times
    assert got == data


def test_sha256_mismatch_names_the_object(object_store):
    uri = _key(object_store, "a.tar")
    storage.write_bytes(uri, b"x" * 1000)
    with pytest.raises(storage.ShardIntegrityError, match="a.tar: sha256"):
        with storage.open_read(uri, sha256="0" * 64) as f:
            f.read()


def test_missing_object_is_unreadable_naming_it(object_store):
    uri = _key(object_store, "gone.tar")
    with pytest.raises(storage.UnreadableError, match="gone.tar"):
        storage.read_bytes(uri)


def test_pipe_runs_an_argv_without_a_shell(tmp_path):
    uri = f"pipe:{sys.executable} -c \"import sys; sys.stdout.write('a;b')\""
    assert storage.read_bytes(uri) == b"a;b"  # a shell would have split at ';'


def test_read_only_locations_refuse_writes():
    with pytest.raises(ValueError, match="read only"):
        storage.write_bytes("https://example.invalid/x", b"")


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """GET with `Range: bytes=N-` over one in-memory object (what object stores and CDNs answer)."""

    data = b""

    def do_GET(self):  # noqa: N802 - the http.server hook's name
        start = int(self.headers.get("Range", "bytes=0-").split("=")[1].split("-")[0])
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(self.data) - start))
        self.end_headers()
        self.wfile.write(self.data[start:])

    def log_message(self, *args):
        pass


def test_http_read_through_a_cutting_link_resumes_with_range_requests():
    from object_store import CuttingProxy

    _RangeHandler.data = os.urandom(400_000)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proxy = CuttingProxy(server.server_address[1], cut_after=50_000).start()
    try:
        with storage.open_read(f"{proxy.endpoint}/a.tar", sha256=hashlib.sha256(_RangeHandler.data).hexdigest()) as f:
            got = f.read()
            reopens = f.raw.reopens
    finally:
        proxy.stop()
        server.shutdown()
    assert got == _RangeHandler.data
    assert reopens >= len(got) // 50_000 - 1  # each cut resumed where it stopped, not from the start


def test_s3_endpoint_from_the_config_key_reaches_the_store_without_the_variable(object_store, monkeypatch):
    """train.s3_endpoint, applied by every job after its config loads (jobs/_cli.config_from_args), is enough to
    reach an S3-compatible store: AWS_ENDPOINT_URL unset, only the standard credential variables left."""
    sys.path.insert(0, str(REPO / "jobs"))
    from _cli import config_from_args, parser

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)  # restored (unset) after the test
    storage._object_fs.cache_clear()
    try:
        args = parser("t").parse_args([f"train.s3_endpoint={object_store.endpoint}", "train.epochs=1"])
        cfg = config_from_args(args)
        assert cfg.train.s3_endpoint == os.environ["AWS_ENDPOINT_URL_S3"] == object_store.endpoint
        uri = _key(object_store, "endpoint.bin")
        storage.write_bytes(uri, b"via the config key")
        assert storage.read_bytes(uri) == b"via the config key"
    finally:
        storage._object_fs.cache_clear()  # the next test's client reads the environment again
