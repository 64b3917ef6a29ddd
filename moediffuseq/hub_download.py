"""A model directory from a local path or a Hugging Face Hub id ("user/name"), downloaded once
into the Hub's cache. Local directories never touch the network, and the ``huggingface_hub``
package (the "hub" extra) is imported only for hub ids."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def resolve_model_dir(path_or_id: str | os.PathLike, revision: Optional[str] = None, **hub_kwargs) -> Path:
    """A local path as it is (the loader names what is missing there); a hub id "user/name"
    that is not a local path is fetched, or found in the Hub's cache (``hub_kwargs``: those of
    ``huggingface_hub.snapshot_download``, e.g. ``cache_dir``, ``token``, ``local_files_only``). A
    "user/name" whose "user" is a local directory is a local path. The repository's config.json is
    fetched first, and the rest only when it is a MoE-DiffuSeq config: a mistyped local path that
    happens to name some other Hub repository downloads nothing else."""
    path = Path(path_or_id)
    text = str(path_or_id)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")) or path.parent.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        head = Path(snapshot_download(text, revision=revision, allow_patterns=["config.json"], **hub_kwargs))
        if not _is_model_config(head / "config.json"):
            raise FileNotFoundError(f"{text}: no such local directory, and the Hugging Face Hub repository of that "
                                    "name holds no MoE-DiffuSeq config.json (nothing else was downloaded); "
                                    "check the path")
        return Path(snapshot_download(text, revision=revision, **hub_kwargs))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(f"{text}: not a local directory, and not in the Hugging Face cache while the Hub "
                                f"cannot be reached (offline?)") from e
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"{text}: not a local directory, and the Hugging Face Hub refused it: {e}") from e


# fields every MoE-DiffuSeq config.json has (and other models' configs lack together)
_MODEL_KEYS = {"d_model", "d_emb", "diffusion_steps", "soft_absorbing", "schedule", "attention", "ffn"}


def _is_model_config(path: Path) -> bool:
    """Whether ``path`` looks like the config.json of a MoE-DiffuSeq model (the full check is the loader's)."""
    import json

    from moediffuseq.limits import read_text

    try:
        values = json.loads(read_text(path, "model config"))
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and _MODEL_KEYS <= set(values)
