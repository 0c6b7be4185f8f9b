"""Which GGUF file the llama.cpp engine serves, downloading it on first use.

`resolve_model(settings)` returns a local path: `settings.engine.model` when set (it must exist),
else `<state_dir>/models/<filename>` from the cache, else that file downloaded from the hub that
`settings.engine.source` names (Hugging Face, or a mirror via `engine.hf_endpoint`; ModelScope via
`engine.modelscope_endpoint`).

A download streams into `<filename>.part` and is renamed into place only when complete, so a crash
never leaves a truncated model under the final name; a later run resumes the `.part` with an HTTP
Range request. Without network it fails within `engine.download_timeout_s` with a
`ModelDownloadError` that says how to use a local file instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType
from typing import Never
from urllib.parse import quote, urlsplit

import httpx
from tqdm import tqdm

from backend.config import EngineSettings, ModelSource, Settings
from backend.errors import ModelDownloadError, ModelError

logger = logging.getLogger(__name__)

READ_TIMEOUT_S = 60.0
LOCAL_MODEL_HINT = (
    "To run without a download, point at a local GGUF file with "
    "QWEN_ENGINE__MODEL=/path/to/model.gguf, or build a tiny test model with "
    "`qwen-stack dev tiny-model DIR` and set QWEN_ENGINE__MODEL to the file it writes."
)


def hub_url(engine: EngineSettings) -> str:
    """The download URL of `engine.repo`/`engine.filename` on `engine.source`."""
    repo = quote(engine.repo, safe="/")
    filename = quote(engine.filename)
    if engine.source is ModelSource.MODELSCOPE:
        base = engine.modelscope_endpoint.rstrip("/")
        return f"{base}/models/{repo}/resolve/master/{filename}"
    base = engine.hf_endpoint.rstrip("/")
    return f"{base}/{repo}/resolve/main/{filename}"


def cached_model_path(settings: Settings) -> Path:
    """Where the default model lives once downloaded: `<state_dir>/models/<filename>`.

    Raises ModelError when `engine.filename` is not a plain file name.
    """
    filename = settings.engine.filename
    if not filename or Path(filename).name != filename or filename in {".", ".."}:
        raise ModelError(f"engine filename must be a plain file name, got {filename!r}")
    return settings.state_dir / "models" / filename


def resolve_model(settings: Settings, *, progress: bool = False) -> Path:
    """The GGUF file to serve; downloads the default model when it is not cached yet.

    `progress` shows a tqdm bar on stderr while downloading.
    Raises ModelError when a configured local path does not exist, ModelDownloadError when the
    download fails (offline, refused, incomplete).
    """
    engine = settings.engine
    if engine.model is not None:
        if not engine.model.is_file():
            raise ModelError(
                f"model file {engine.model} does not exist; check QWEN_ENGINE__MODEL, or unset it "
                "to download the default model"
            )
        return engine.model
    dest = cached_model_path(settings)
    if dest.is_file():
        return dest
    logger.info("model %s not cached; downloading from %s", engine.filename, engine.source)
    return download_file(
        hub_url(engine), dest, connect_timeout_s=engine.download_timeout_s, progress=progress
    )


def download_file(
    url: str, dest: Path, *, connect_timeout_s: float, progress: bool = False
) -> Path:
    """Download `url` to `dest` through `dest.part` (resumed when present), then rename.

    `connect_timeout_s` bounds connecting (seconds); reads wait at most READ_TIMEOUT_S each.
    Returns `dest`. Raises ModelDownloadError; a partial download stays in `dest.part` for the
    next attempt.
    """
    part = dest.with_name(dest.name + ".part")
    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=connect_timeout_s)
    host = urlsplit(url).netloc or url
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with httpx.Client(timeout=timeout, follow_redirects=True) as client:
            _fetch(client, url, part, progress=progress)
    except httpx.TimeoutException as exc:
        raise ModelDownloadError(
            f"timed out downloading {dest.name} from {host} ({type(exc).__name__}); "
            f"{LOCAL_MODEL_HINT}"
        ) from None
    except httpx.HTTPError as exc:
        raise ModelDownloadError(
            f"could not download {dest.name} from {host}: {exc}. {LOCAL_MODEL_HINT}"
        ) from None
    except OSError as exc:
        raise ModelDownloadError(
            f"could not write {dest.name} to the model cache: {exc.strerror}"
        ) from None
    part.replace(dest)
    logger.info("model %s downloaded", dest.name)
    return dest


def _fetch(client: httpx.Client, url: str, part: Path, *, progress: bool) -> None:
    """Fill `part` with the whole body of `url`, resuming what is already there."""
    for _ in range(2):
        offset = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with client.stream("GET", url, headers=headers) as response:
            if response.status_code == httpx.codes.REQUESTED_RANGE_NOT_SATISFIABLE:
                logger.warning("server refused to resume %s; starting over", part.name)
                part.unlink()
                continue
            if response.status_code == httpx.codes.NOT_FOUND:
                raise ModelDownloadError(
                    f"{urlsplit(url).netloc} has no {url.rsplit('/', 1)[-1]} (HTTP 404); check "
                    f"QWEN_ENGINE__REPO and QWEN_ENGINE__FILENAME. {LOCAL_MODEL_HINT}"
                )
            response.raise_for_status()
            resumed = response.status_code == httpx.codes.PARTIAL_CONTENT
            start = offset if resumed else 0
            total = _total_bytes(response, start)
            with (
                _Progress(enabled=progress, total=total, initial=start, name=part.stem) as bar,
                part.open("ab" if resumed else "wb") as sink,
            ):
                for chunk in response.iter_bytes():
                    sink.write(chunk)
                    bar.update(len(chunk))
            written = part.stat().st_size
            if total is not None and written != total:
                raise ModelDownloadError(
                    f"download of {part.stem} stopped at {written} of {total} bytes; "
                    "run again to resume"
                )
            return
    raise ModelDownloadError(f"server keeps refusing to resume {part.stem}; delete {part.name}")


def _total_bytes(response: httpx.Response, start: int) -> int | None:
    """Full size of the file from Content-Range or Content-Length, if the server says."""
    content_range = response.headers.get("content-range", "")
    if "/" in content_range and not content_range.endswith("/*"):
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("content-length")
    if length is None:
        return None
    if response.status_code == httpx.codes.PARTIAL_CONTENT:
        return start + int(length)
    return int(length)


class _Progress:
    """A tqdm bar when enabled, else nothing."""

    def __init__(self, *, enabled: bool, total: int | None, initial: int, name: str) -> None:
        self._bar: tqdm[Never] | None = (
            tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=name)
            if enabled
            else None
        )

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.close()
