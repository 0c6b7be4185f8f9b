"""Model resolution and download, against a file server on 127.0.0.1 (never the real hubs)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from backend.config import EngineSettings, ModelSource, Settings
from backend.errors import ModelDownloadError, ModelError
from backend.serving.models import download_file, hub_url, resolve_model

BODY = bytes(range(256)) * 64  # 16 KiB
REPO = "Qwen/Tiny-GGUF"
FILENAME = "tiny.gguf"


@dataclass
class Hub:
    """A tiny file host: serves BODY at any path ending in FILENAME, with HTTP Range support."""

    base_url: str
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    honour_range: bool = True
    truncate_next: bool = False


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            range_header = self.headers.get("Range")
            hub.requests.append((self.path, range_header))
            if not self.path.endswith("/" + FILENAME):
                self.send_error(404)
                return
            start = 0
            if range_header and hub.honour_range:
                start = int(range_header.removeprefix("bytes=").split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(BODY) - 1}/{len(BODY)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(BODY) - start))
            self.end_headers()
            payload = BODY[start:]
            if hub.truncate_next:
                hub.truncate_next = False
                payload = payload[: len(payload) // 2]
                self.close_connection = True
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def hub() -> Iterator[Hub]:
    hub = Hub(base_url="")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def refused_url() -> str:
    """A loopback URL on which nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _settings(tmp_path: Path, **engine: object) -> Settings:
    defaults: dict[str, object] = {"repo": REPO, "filename": FILENAME, "download_timeout_s": 2.0}
    return Settings(state_dir=tmp_path, engine=EngineSettings.model_validate(defaults | engine))


def test_hub_url_huggingface_mirror() -> None:
    engine = EngineSettings(repo=REPO, filename=FILENAME, hf_endpoint="https://hf-mirror.com/")
    assert hub_url(engine) == f"https://hf-mirror.com/{REPO}/resolve/main/{FILENAME}"


def test_hub_url_modelscope() -> None:
    engine = EngineSettings(repo=REPO, filename=FILENAME, source=ModelSource.MODELSCOPE)
    assert hub_url(engine) == f"https://modelscope.cn/models/{REPO}/resolve/master/{FILENAME}"


def test_local_model_is_used(tmp_path: Path) -> None:
    model = tmp_path / "mine.gguf"
    model.write_bytes(b"GGUF")
    assert resolve_model(_settings(tmp_path, model=model)) == model


def test_missing_local_model_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(_settings(tmp_path, model=tmp_path / "absent.gguf"))


def test_cached_model_needs_no_network(tmp_path: Path, refused_url: str) -> None:
    cached = tmp_path / "models" / FILENAME
    cached.parent.mkdir()
    cached.write_bytes(BODY)
    assert resolve_model(_settings(tmp_path, hf_endpoint=refused_url)) == cached


def test_download_from_hub_into_cache(tmp_path: Path, hub: Hub) -> None:
    path = resolve_model(_settings(tmp_path, hf_endpoint=hub.base_url))
    assert (path, path.read_bytes()) == (tmp_path / "models" / FILENAME, BODY)


def test_download_uses_huggingface_path(tmp_path: Path, hub: Hub) -> None:
    resolve_model(_settings(tmp_path, hf_endpoint=hub.base_url))
    assert hub.requests == [(f"/{REPO}/resolve/main/{FILENAME}", None)]


def test_download_uses_modelscope_path(tmp_path: Path, hub: Hub) -> None:
    settings = _settings(tmp_path, source=ModelSource.MODELSCOPE, modelscope_endpoint=hub.base_url)
    resolve_model(settings)
    assert hub.requests == [(f"/models/{REPO}/resolve/master/{FILENAME}", None)]


def test_interrupted_download_leaves_only_part(tmp_path: Path, hub: Hub) -> None:
    hub.truncate_next = True
    dest = tmp_path / FILENAME
    with pytest.raises(ModelDownloadError):
        download_file(f"{hub.base_url}/{FILENAME}", dest, connect_timeout_s=2)
    assert (dest.exists(), dest.with_name(FILENAME + ".part").exists()) == (False, True)


def test_interrupted_download_resumes(tmp_path: Path, hub: Hub) -> None:
    hub.truncate_next = True
    dest = tmp_path / FILENAME
    with pytest.raises(ModelDownloadError):
        download_file(f"{hub.base_url}/{FILENAME}", dest, connect_timeout_s=2)
    download_file(f"{hub.base_url}/{FILENAME}", dest, connect_timeout_s=2)
    assert (dest.read_bytes(), hub.requests[-1][1]) == (BODY, f"bytes={len(BODY) // 2}-")


def test_resume_restarts_when_range_ignored(tmp_path: Path, hub: Hub) -> None:
    hub.honour_range = False
    dest = tmp_path / FILENAME
    dest.with_name(FILENAME + ".part").write_bytes(b"stale bytes")
    download_file(f"{hub.base_url}/{FILENAME}", dest, connect_timeout_s=2)
    assert dest.read_bytes() == BODY


def test_progress_bar_when_asked(
    tmp_path: Path, hub: Hub, capsys: pytest.CaptureFixture[str]
) -> None:
    download_file(f"{hub.base_url}/{FILENAME}", tmp_path / FILENAME, connect_timeout_s=2,
                  progress=True)  # fmt: skip
    assert "100%" in capsys.readouterr().err


def test_no_progress_bar_by_default(
    tmp_path: Path, hub: Hub, capsys: pytest.CaptureFixture[str]
) -> None:
    download_file(f"{hub.base_url}/{FILENAME}", tmp_path / FILENAME, connect_timeout_s=2)
    assert capsys.readouterr().err == ""


def test_missing_file_on_hub(tmp_path: Path, hub: Hub) -> None:
    with pytest.raises(ModelDownloadError, match="404"):
        download_file(f"{hub.base_url}/other.gguf", tmp_path / "other.gguf", connect_timeout_s=2)


def test_offline_error_says_how_to_use_a_local_file(tmp_path: Path, refused_url: str) -> None:
    with pytest.raises(ModelDownloadError, match=r"QWEN_ENGINE__MODEL=/path/to/model\.gguf"):
        resolve_model(_settings(tmp_path, hf_endpoint=refused_url))


def test_offline_error_hides_the_traceback(tmp_path: Path, refused_url: str) -> None:
    with pytest.raises(ModelDownloadError) as caught:
        resolve_model(_settings(tmp_path, hf_endpoint=refused_url))
    assert caught.value.__suppress_context__ and caught.value.__cause__ is None
