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
    ``huggingface_hub.snapshot_download``, e.g. ``cache_dir``, ``token``, ``local_files_only``)."""
    path = Path(path_or_id)
    text = str(path_or_id)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, revision=revision, **hub_kwargs))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(f"{text}: not a local directory, and not in the Hugging Face cache while the Hub "
                                f"cannot be reached (offline?)") from e
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"{text}: not a local directory, and the Hugging Face Hub refused it: {e}") from e
