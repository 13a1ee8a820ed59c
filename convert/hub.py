"""Push and pull model folders to and from the Hugging Face Hub (huggingface-hub).

Both directions validate the folder (common.checkpoint) so a broken model never travels. Tokens and
offline mode follow huggingface-hub's own environment: HF_TOKEN, HF_HUB_OFFLINE. `api` and
`download` can be replaced (tests pass a local fake transport; nothing here needs the network).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from common import checkpoint as ckpt

MODEL_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json", "README.md"]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def push(model_dir: str | os.PathLike, repo_id: str, *, private: bool = False, token: str | None = None,
         message: str | None = None, api=None) -> str:
    """Upload a validated model folder to `repo_id` (created if missing); returns the repo id."""
    config, _, _ = ckpt.validate_folder(model_dir)
    if _offline():
        raise ValueError("HF_HUB_OFFLINE is set: unset it to push to the Hub")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    token = token or os.environ.get("HF_TOKEN")
    api.create_repo(repo_id, token=token, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(model_dir), token=token, allow_patterns=MODEL_PATTERNS,
                      commit_message=message or f"Upload lm-sleep model ({config.layer_types}, d={config.d_model})")
    return repo_id


def pull(repo_id: str, out_dir: str | os.PathLike, *, revision: str | None = None, token: str | None = None,
         overwrite: bool = False, download=None) -> Path:
    """Download `repo_id` into out_dir (atomically; validated before it appears there)."""
    if download is None:
        from huggingface_hub import snapshot_download

        download = snapshot_download
    token = token or os.environ.get("HF_TOKEN")
    with ckpt.atomic_folder(out_dir, overwrite=overwrite) as tmp:
        try:
            download(repo_id, revision=revision, local_dir=str(tmp), token=token, allow_patterns=MODEL_PATTERNS,
                     local_files_only=_offline())
        except Exception as e:  # network, auth, missing repo, offline without cache: one line for the user
            raise ValueError(f"could not download {repo_id!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface-hub's local_dir bookkeeping
        ckpt.validate_folder(tmp)
    return Path(out_dir)
