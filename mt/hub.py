"""Model flags that take a Hugging Face Hub id as well as a directory: `--policy org/name`.

A value that is an existing directory is used as it is. Otherwise a value shaped like a Hub id
(`org/name`) is looked up in the Hugging Face cache (HF_HUB_CACHE, default ~/.cache/huggingface/hub)
and resolved to its snapshot directory (models--org--name/snapshots/<commit>/), the layout that
`hf download org/name` writes. Only when downloads are allowed (HF_HUB_OFFLINE unset or 0, the
library's own switch) does a missing model get downloaded; offline, a missing model is one
`error: ...` paragraph naming the `hf download` command. Anything else is returned unchanged, so the
loaders report a missing directory as they always have.

Only the files a model directory is read for are fetched: top-level config/tokenizer JSON, the
safetensors weights, chat templates, sentencepiece/tiktoken vocabularies. Subfolders (Llama-3's
`original/` holds a second 16 GB copy) and Mistral's `consolidated.safetensors` are skipped.
"""
from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import constants, snapshot_download
# from .utils, not .errors: the same classes in every release transformers>=4.46 allows
from huggingface_hub.utils import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

from mt.errors import UserError

ALLOW = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
IGNORE = ["*/*", "consolidated*"]  # subfolders (e.g. original/), duplicate consolidated weights

# org/name: the Hub's own character rules (huggingface_hub.utils.validate_repo_id), one slash
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(UserError):
    """A Hub id that is not in the cache (and may not be downloaded), or that the Hub refused."""


def is_repo_id(name: str) -> bool:
    """`org/name` (no leading `/`, `.` or `~`, exactly one slash, no `--` or `..`)."""
    return bool(_REPO_ID.match(name)) and "--" not in name and ".." not in name


def resolve_model(name_or_dir: str, flag: str) -> Path:
    """The directory a model flag names: the directory itself, or a Hub id's cached snapshot
    (downloaded first when HF_HUB_OFFLINE allows it)."""
    path = Path(name_or_dir).expanduser()
    if not name_or_dir or path.is_dir() or not is_repo_id(name_or_dir):
        return path
    # read at call time, not import time: huggingface_hub fixes both when it is imported, and a
    # test (or a caller) may point them elsewhere afterwards
    offline, cache = constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE
    try:
        return Path(snapshot_download(name_or_dir, local_files_only=offline, allow_patterns=ALLOW,
                                      ignore_patterns=IGNORE))
    except LocalEntryNotFoundError as e:
        how = ("downloads are off (HF_HUB_OFFLINE=1)" if offline
               else f"downloading failed ({type(e).__name__}: {e})")
        raise HubError(f"{flag} {name_or_dir}: not a local directory, and not in the Hugging Face "
                       f"cache {cache} (or cached incompletely); {how}. Fix: run `hf download "
                       f"{name_or_dir}` on a machine with network (with HF_HUB_CACHE pointing at "
                       "this cache), unset HF_HUB_OFFLINE to let this command download it, or pass "
                       "a local model directory (check the path if you meant one)") from None
    except (HfHubHTTPError, HFValidationError) as e:  # not found, gated, private, bad revision
        raise HubError(f"{flag} {name_or_dir}: the Hugging Face Hub refused it ({type(e).__name__}: "
                       f"{str(e).splitlines()[0]}). Fix: check the id (a local directory must "
                       "exist), or for a gated model accept its licence on huggingface.co and "
                       "run `hf auth login`") from None


def resolve_flags(args, *names: str):
    """Resolve the named model flags of a parsed flags object in place; empty ones stay empty."""
    for name in names:
        value = getattr(args, name)
        if value:
            setattr(args, name, str(resolve_model(value, f"--{name}")))
    return args
