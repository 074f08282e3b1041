"""Shards over http(s) with credentials, against a real HTTP server on 127.0.0.1 that requires them (Python's
http.server in a thread): user-info in the URL becomes an HTTP Basic Authorization header (as curl and fsspec
take it), a bearer token can come from BRCD_HTTP_TOKEN, neither is ever in a message; permanent errors (401,
403, 404, an unknown host) fail at once in one line naming the shard and the status, while a 503 is retried.
The reader is the one training and evaluation use (storage.open_read under data.reading), on the tiny shards."""

from __future__ import annotations

import base64
import http.server
import threading
import time
from pathlib import Path

import pytest

from brcd_dist import storage
from brcd_dist.data import eval_batches, load_manifest

USER, PASSWORD = "alice", "s3cr3t pw/:@"  # characters that must be percent-encoded in a URL
QUOTED_PASSWORD = "s3cr3t%20pw%2F%3A%40"
TOKEN = "tok-0123456789abcdef"


class Server:
    """Serves one directory; answers 401 without the right credentials; `fail_next` 503s answer the next GETs."""

    def __init__(self, root: Path):
        self.root, self.requests, self.fail_next = root, [], 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                auth = self.headers.get("Authorization", "")
                server.requests.append((self.path, auth))
                good = {
                    "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(),
                    f"Bearer {TOKEN}",
                }
                if auth not in good:
                    self.send_response(401, "Unauthorized")
                    self.send_header("WWW-Authenticate", 'Basic realm="shards"')
                    self.end_headers()
                    return
                if server.fail_next:
                    server.fail_next -= 1
                    self.send_response(503, "Service Unavailable")
                    self.end_headers()
                    return
                path = server.root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_response(404, "Not Found")
                    self.end_headers()
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, user_info: str = f"{USER}:{QUOTED_PASSWORD}@") -> str:
        return f"http://{user_info}127.0.0.1:{self.port}"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tiny_shards):
    s = Server(tiny_shards)
    yield s
    s.stop()


@pytest.fixture
def no_token(monkeypatch):
    monkeypatch.delenv(storage.HTTP_TOKEN_ENV, raising=False)


def first_shard(tiny_shards) -> str:
    return load_manifest(tiny_shards).splits["database"].shards[0]


def test_user_info_in_the_url_becomes_a_basic_authorization_header_and_leaves_the_request_line(
    server, tiny_shards, no_token
):
    name = first_shard(tiny_shards)
    with storage.open_read(f"{server.url()}/{name}") as f:
        assert f.read() == (tiny_shards / name).read_bytes()
    (path, auth), *_ = server.requests
    assert path == f"/{name}"  # no user-info on the wire but in the header
    assert base64.b64decode(auth.removeprefix("Basic ")).decode() == f"{USER}:{PASSWORD}"


def test_a_bearer_token_comes_from_brcd_http_token(server, tiny_shards, monkeypatch):
    monkeypatch.setenv(storage.HTTP_TOKEN_ENV, TOKEN)
    name = first_shard(tiny_shards)
    with storage.open_read(f"{server.url('')}/{name}") as f:
        assert f.read() == (tiny_shards / name).read_bytes()
    assert server.requests == [(f"/{name}", f"Bearer {TOKEN}")]


@pytest.mark.parametrize(
    "case,user_info,status",
    [
        ("wrong password", f"{USER}:wrong-pw@", "HTTP 401 Unauthorized (check the credentials"),
        ("no credentials", "", "HTTP 401 Unauthorized"),
        ("no such shard", f"{USER}:{QUOTED_PASSWORD}@", "HTTP 404 Not Found (no such shard at that URL)"),
    ],
)
def test_a_permanent_http_error_fails_at_once_naming_the_shard_and_the_status(
    case, user_info, status, server, tiny_shards, no_token
):
    name = "database-999999.tar" if case == "no such shard" else first_shard(tiny_shards)
    t0 = time.monotonic()
    with pytest.raises(storage.PermanentReadError) as err:
        with storage.open_read(f"{server.url(user_info)}/{name}") as f:
            f.read()
    assert time.monotonic() - t0 < 2 and len(server.requests) == 1  # not retried
    (line,) = str(err.value).splitlines()
    assert name in line and status in line
    assert "wrong-pw" not in line and "s3cr3t" not in line and QUOTED_PASSWORD not in line


def test_an_unknown_host_fails_at_once_naming_it(no_token):
    t0 = time.monotonic()
    with pytest.raises(storage.UnreadableError) as err:
        with storage.open_read(f"http://{USER}:{QUOTED_PASSWORD}@no-such-host.invalid/shard-000000.tar") as f:
            f.read()
    (line,) = str(err.value).splitlines()
    assert "shard-000000.tar" in line and "no-such-host.invalid" in line and "s3cr3t" not in line
    if isinstance(err.value, storage.PermanentReadError):  # the resolver said "no such name"
        assert "unknown host" in line and time.monotonic() - t0 < 5
    # else the machine has no resolver at all (EAI_AGAIN): a transient error, retried, still named


def test_a_server_error_is_retried_and_the_shard_then_read(server, tiny_shards, no_token, monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    server.fail_next = 2
    name = first_shard(tiny_shards)
    with storage.open_read(f"{server.url()}/{name}") as f:
        assert f.read() == (tiny_shards / name).read_bytes()
    assert len(server.requests) == 3


def test_an_evaluation_pass_reads_every_sample_over_http_with_credentials(server, tiny_shards, no_token):
    manifest = load_manifest(tiny_shards)
    batches = eval_batches(
        manifest, "database", rank=0, world_size=1, batch_size=64, num_workers=0, image_size=32, in_chans=1,
        shards_url=server.url(),
    )  # fmt: skip
    keys = [k for batch in batches for k in batch["key"]]
    assert sorted(keys) == sorted(manifest.splits["database"].keys)


def test_an_evaluation_pass_with_wrong_credentials_stops_at_the_first_shard_in_one_line(server, tiny_shards, no_token):
    manifest = load_manifest(tiny_shards)
    batches = eval_batches(
        manifest, "database", rank=0, world_size=1, batch_size=64, num_workers=0, image_size=32, in_chans=1,
        shards_url=server.url(f"{USER}:wrong-pw@"),
    )  # fmt: skip
    with pytest.raises(storage.PermanentReadError) as err:
        list(batches)
    (line,) = str(err.value).splitlines()
    assert manifest.splits["database"].shards[0] in line and "HTTP 401" in line and "wrong-pw" not in line
    assert len(server.requests) == 1


def test_distill_refuses_http_shards_it_cannot_read_before_any_worker_starts(
    server, tiny_shards, no_token, tmp_path, monkeypatch, capsys
):
    import importlib.util
    import sys

    from conftest import REPO

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BRCD_HOME", str(tmp_path))
    sys.path.insert(0, str(REPO / "jobs"))
    spec = importlib.util.spec_from_file_location("http_distill", REPO / "jobs" / "distill.py")
    distill = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(distill)
    url = server.url(f"{USER}:wrong-pw@")
    with pytest.raises(SystemExit) as done:
        distill.main(
            ["data.source=shards", f"data.shards_dir={tiny_shards}", f"data.shards_url={url}", "tracking.enabled=false"]
        )
    assert done.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "-000000.tar: HTTP 401 Unauthorized" in line and "wrong-pw" not in line
    assert list(tmp_path.iterdir()) == []  # no runs/, no mlflow.db
