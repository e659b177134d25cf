"""url_file against a real HTTP server on 127.0.0.1: download, cache, resume, verify, offline, locking."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bobench.backbones.download import cached_path, url_file, weights_dir
from bobench.backbones.weights import WeightsError, WeightsUnavailableError, reachable
from user_models import count_network

PAYLOAD = os.urandom(300_000) + b"end"  # not a multiple of the chunk size, random so halves differ
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass
class Served:
    """What the server holds and what it has answered (shared with the handler threads)."""

    files: dict[str, bytes] = field(default_factory=dict)
    honour_range: bool = True
    delay_per_chunk: float = 0.0  # slows a transfer so that concurrent callers truly overlap
    cut_at: int | None = None  # drop the connection once this many bytes of the body are sent
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    bytes_sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(state: Served) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            with state.lock:
                state.requests.append((self.path, rng))
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404, "Not Found")
                return
            start = 0
            if rng and state.honour_range:
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            end = len(body) if state.cut_at is None else state.cut_at
            for i in range(start, end, 64 * 1024):
                chunk = body[i : min(i + 64 * 1024, end)]
                # Counted before it is written: the client can hold the whole body (and the test assert)
                # before this thread runs again, which under load made a count taken after lag behind.
                with state.lock:
                    state.bytes_sent += len(chunk)
                self.wfile.write(chunk)
                if state.delay_per_chunk:
                    time.sleep(state.delay_per_chunk)

        def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
            pass

    return Handler


@pytest.fixture
def server() -> Iterator[tuple[str, Served]]:
    """A threaded HTTP server on a free port serving ``/w/model.pth``; yields (base URL, state)."""
    state = Served(files={"/w/model.pth": PAYLOAD})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture(autouse=True)
def _fresh_probe() -> Iterator[None]:
    """Forget cached reachability: a closed port of one test may be a server's port in the next."""
    reachable.cache_clear()
    yield
    reachable.cache_clear()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound but not listening, and held for the whole
    test, so no other process can take it in between (releasing it first would race)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_weights_dir_and_cached_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert weights_dir() == Path(os.environ["BOBENCH_CACHE"]) / "weights"
    url = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth?download=1"
    assert cached_path(url) == weights_dir() / "dl.fbaipublicfiles.com" / "mae_pretrain_vit_base.pth"
    assert cached_path("http://127.0.0.1:8000/a/b.pt", "x.pt") == weights_dir() / "127.0.0.1_8000" / "x.pt"
    monkeypatch.setenv("BOBENCH_WEIGHTS", str(tmp_path / "w"))
    assert weights_dir() == tmp_path / "w"
    with pytest.raises(ValueError, match="file name"):
        cached_path("https://example.com/")
    with pytest.raises(ValueError, match="http"):
        cached_path("ftp://example.com/a.pth")


def test_download_verifies_then_cache_hit_makes_no_request(server: tuple[str, Served]) -> None:
    base, state = server
    url = f"{base}/w/model.pth"
    path = url_file(url, sha256=DIGEST)
    assert path == cached_path(url) and path.read_bytes() == PAYLOAD
    assert not path.with_name("model.pth.part").exists()
    assert len(state.requests) == 1 and state.requests[0][1] is None
    state.requests.clear()
    assert url_file(url, sha256=DIGEST[:12]) == path  # a digest prefix is accepted too
    assert url_file(url, download=False) == path
    assert state.requests == []


def test_resume_requests_only_the_missing_bytes(server: tuple[str, Served]) -> None:
    base, state = server
    url = f"{base}/w/model.pth"
    half = len(PAYLOAD) // 2
    part = cached_path(url).with_name("model.pth.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:half])
    path = url_file(url, sha256=DIGEST)
    assert path.read_bytes() == PAYLOAD
    assert state.requests == [("/w/model.pth", f"bytes={half}-")]
    assert state.bytes_sent == len(PAYLOAD) - half


def test_broken_transfer_keeps_the_part_and_the_next_call_resumes(server: tuple[str, Served]) -> None:
    base, state = server
    url = f"{base}/w/model.pth"
    state.cut_at = 100_000
    with pytest.raises(WeightsError, match="resume"):
        url_file(url, sha256=DIGEST)
    assert not cached_path(url).exists()
    assert cached_path(url).with_name("model.pth.part").stat().st_size == 100_000
    state.cut_at = None
    state.bytes_sent = 0
    assert url_file(url, sha256=DIGEST).read_bytes() == PAYLOAD
    assert state.requests[-1][1] == "bytes=100000-" and state.bytes_sent == len(PAYLOAD) - 100_000


def test_complete_part_is_finished_without_a_body(server: tuple[str, Served]) -> None:
    base, state = server
    url = f"{base}/w/model.pth"
    part = cached_path(url).with_name("model.pth.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD)  # a crash between the last byte and the rename
    assert url_file(url, sha256=DIGEST).read_bytes() == PAYLOAD
    assert state.bytes_sent == 0


def test_server_ignoring_range_gives_a_full_correct_download(server: tuple[str, Served]) -> None:
    base, state = server
    state.honour_range = False
    url = f"{base}/w/model.pth"
    part = cached_path(url).with_name("model.pth.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:1000])
    assert url_file(url, sha256=DIGEST).read_bytes() == PAYLOAD
    assert state.bytes_sent == len(PAYLOAD)


def test_wrong_sha256_deletes_the_download(server: tuple[str, Served]) -> None:
    base, _ = server
    url = f"{base}/w/model.pth"
    wrong = "0" * 64
    with pytest.raises(WeightsError, match=rf"{DIGEST}, expected {wrong}"):
        url_file(url, sha256=wrong)
    path = cached_path(url)
    assert not path.exists() and not path.with_name("model.pth.part").exists()


def test_corrupt_cached_file_is_reported_without_a_request(server: tuple[str, Served]) -> None:
    base, state = server
    url = f"{base}/w/model.pth"
    path = url_file(url, sha256=DIGEST)
    state.requests.clear()
    path.write_bytes(PAYLOAD[:-1])  # new size and mtime: verified again
    with pytest.raises(WeightsError, match="expected"):
        url_file(url, sha256=DIGEST)
    assert state.requests == []


def test_http_404_names_url_and_status(server: tuple[str, Served]) -> None:
    base, _ = server
    url = f"{base}/w/missing.pth"
    with pytest.raises(WeightsError, match="404") as info:
        url_file(url)
    assert url in str(info.value)
    assert not isinstance(info.value, WeightsUnavailableError)
    assert not cached_path(url).exists()


def test_closed_port_fails_fast_with_the_cache_path(
    closed_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"http://127.0.0.1:{closed_port}/w/model.pth"
    calls = count_network(monkeypatch.setattr, block=False)  # real connections, counted
    with pytest.raises(WeightsUnavailableError) as info:
        url_file(url, sha256=DIGEST)
    # "fast": the one reachability probe (create_connection does its own lookup and connect), refused at
    # once, then no download attempt and no retry back-off. Wall time is not checked: load stretches it.
    assert calls == {"getaddrinfo": 1, "create_connection": 1, "connect": 1, "sleep": 0}
    msg = str(info.value)
    assert url in msg and str(cached_path(url)) in msg and "--weights PATH" in msg and "weights=PATH" in msg
    assert f"127.0.0.1:{closed_port} cannot be reached" in msg  # the probe answered, not a download try


def test_bobench_offline_sends_no_request(
    server: tuple[str, Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, state = server
    monkeypatch.setenv("BOBENCH_OFFLINE", "1")
    url = f"{base}/w/model.pth"
    with pytest.raises(WeightsUnavailableError, match="BOBENCH_OFFLINE") as info:
        url_file(url)
    assert str(cached_path(url)) in str(info.value)
    assert state.requests == []


def test_download_false_with_nothing_cached(server: tuple[str, Served]) -> None:
    base, state = server
    url = f"{base}/w/model.pth"
    with pytest.raises(WeightsUnavailableError, match="download=False") as info:
        url_file(url, download=False)
    assert url in str(info.value) and str(cached_path(url)) in str(info.value)
    assert state.requests == []


def test_concurrent_callers_share_one_download(server: tuple[str, Served]) -> None:
    base, state = server
    state.delay_per_chunk = 0.02  # ~0.1 s per transfer, so the second caller arrives mid-download
    url = f"{base}/w/model.pth"
    results: list[Path | BaseException] = []

    def fetch() -> None:
        try:
            results.append(url_file(url, sha256=DIGEST))
        except BaseException as exc:  # surfaced by the assert below
            results.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 4 and all(r == cached_path(url) for r in results), results
    assert cached_path(url).read_bytes() == PAYLOAD
    assert len(state.requests) == 1  # the waiters found the finished file under the lock


def test_progress_bar_on_a_terminal(
    server: tuple[str, Served], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    base, _ = server
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the bar only draws on a terminal
    assert url_file(f"{base}/w/model.pth", sha256=DIGEST).read_bytes() == PAYLOAD
    assert "model.pth" in capsys.readouterr().err
