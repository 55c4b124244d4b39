"""Checkpoints: a Hub id or local folder, resolved to a folder, read lazily tensor by tensor.

This module knows files: where a checkpoint lives, which safetensors shard holds which tensor,
each tensor's shape and dtype (read from the headers, no data loaded), and how to load one tensor.
It knows nothing of model families or merging. It reads safetensors only: pickle (``.bin``)
checkpoints are refused, and no remote code is ever run.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import torch
from safetensors import safe_open

# The files a merge needs from a Hub repository: weights, their index, configs, tokenizer,
# processor and chat template. Never ``*.bin``, ``*.py`` or anything else.
HUB_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.jinja",
    "*.txt",
    "*.model",
    "*.tiktoken",
]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
ENV_ROOTS = "DIM3_ALLOWED_ROOTS"

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint cannot be found, read or trusted; the message says why and what to do."""


def default_allowed_roots() -> list[Path]:
    """The bundled assets folder and the current working directory."""
    return [Path(__file__).resolve().parent.parent / "assets", Path.cwd()]


def allowed_roots_from_env() -> list[Path]:
    """Local roots the app may read: ``$DIM3_ALLOWED_ROOTS`` (os.pathsep-separated) or defaults."""
    value = os.environ.get(ENV_ROOTS, "").strip()
    if not value:
        return default_allowed_roots()
    return [Path(p).expanduser().resolve() for p in value.split(os.pathsep) if p.strip()]


def looks_local(ref: str) -> bool:
    """A reference is a local path if it exists or is written like one (absolute, ./, ~)."""
    return (
        ref.startswith(("/", "./", "../", "~", "."))
        or os.path.isdir(os.path.expanduser(ref))
        or not HUB_ID.match(ref)
    )


def check_under_roots(path: Path, roots: Sequence[str | Path]) -> Path:
    """Return ``path`` resolved (symlinks followed) if it lies under one of ``roots``."""
    real = path.expanduser().resolve()
    for root in roots:
        if real.is_relative_to(Path(root).expanduser().resolve()):
            return real
    shown = ", ".join(str(r) for r in roots) or "(none)"
    raise CheckpointError(
        f"local path {str(path)!r} is outside the allowed folders ({shown}); move the checkpoint "
        f"under one of them or add its folder to ${ENV_ROOTS}"
    )


def _resolve_local(ref: str, allowed_roots: Sequence[str | Path] | None) -> Path:
    path = Path(ref).expanduser()
    if allowed_roots is not None:
        path = check_under_roots(path, allowed_roots)
    if not path.exists():
        raise CheckpointError(f"local folder {ref!r} does not exist; check the path")
    if not path.is_dir():
        raise CheckpointError(f"{ref!r} is a file; give the checkpoint's folder instead")
    return path.resolve()


def _hub_error(ref: str, revision: str | None, exc: Exception) -> CheckpointError:
    from huggingface_hub import errors

    at = f" at revision {revision!r}" if revision else ""
    if isinstance(exc, errors.GatedRepoError):
        return CheckpointError(
            f"{ref!r} is gated on the Hub: accept its licence on its page and set HF_TOKEN"
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return CheckpointError(f"revision {revision!r} does not exist in {ref!r}; check its name")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return CheckpointError(
            f"no model {ref!r} on the Hub (or it is private: set HF_TOKEN); check the id"
        )
    if isinstance(exc, errors.LocalEntryNotFoundError):
        return CheckpointError(
            f"cannot download {ref!r}{at}: the Hub is unreachable or offline mode is on "
            "(HF_HUB_OFFLINE), and it is not in the local cache; connect, or give a local folder"
        )
    return CheckpointError(f"cannot fetch {ref!r}{at} from the Hub: {exc}")


def _resolve_hub(ref: str, revision: str | None, token: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            ref,
            revision=revision,
            allow_patterns=HUB_PATTERNS,
            token=token or os.environ.get("HF_TOKEN") or None,
        )
    except Exception as exc:  # the Hub client raises many types; each is mapped to a message
        raise _hub_error(ref, revision, exc) from exc
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")):
        _refuse_pickle_repo(ref, revision, token)
    return folder


def _refuse_pickle_repo(ref: str, revision: str | None, token: str | None) -> None:
    """A Hub repo without safetensors: say so, naming its pickle files when the Hub answers."""
    from huggingface_hub import HfApi

    try:
        files = HfApi().list_repo_files(ref, revision=revision, token=token or None)
    except Exception:  # offline or unreachable: the generic message below still holds
        files = []
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    kind = (
        f"only pickle weights ({', '.join(pickles[:3])})" if pickles else "no safetensors weights"
    )
    raise CheckpointError(
        f"{ref!r} has {kind}; DiM3 reads safetensors only, since pickle can run code: pick a "
        "revision with safetensors (many repos have a refs/pr/N conversion) or convert it first"
    )


def resolve(
    ref: str,
    revision: str | None = None,
    *,
    allowed_roots: Sequence[str | Path] | None = None,
    token: str | None = None,
) -> Path:
    """Resolve a Hub id (with optional revision) or a local folder to a local folder.

    Local folders must lie under ``allowed_roots`` when it is given (None allows any path, as
    the command line does). Hub downloads fetch only safetensors, configs, tokenizer, processor
    and chat template files, honour ``HF_TOKEN`` and offline mode, and never log the token.
    """
    ref = (ref or "").strip()
    if not ref:
        raise CheckpointError("no checkpoint given: enter a Hub id (org/name) or a local folder")
    if looks_local(ref):
        if revision:
            raise CheckpointError(f"a revision ({revision!r}) applies to Hub ids, not {ref!r}")
        return _resolve_local(ref, allowed_roots)
    return _resolve_hub(ref, revision, token)


def _weight_files(path: Path) -> dict[str, Path]:
    """Map each tensor name to its shard, from the index if present, else from the headers."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (path / f).exists()})
        if missing:
            raise CheckpointError(
                f"{path} is incomplete: its index names missing shard(s) {missing[:3]}; "
                "download the checkpoint again"
            )
        return {key: path / f for key, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise CheckpointError(
                f"{path} holds only pickle weights ({', '.join(pickles[:3])}); DiM3 reads "
                "safetensors only, since pickle can run code: use a safetensors revision of "
                "the model (many Hub repos have one) or convert it yourself first"
            )
        raise CheckpointError(f"{path} has no *.safetensors weights; is it a model folder?")
    mapping: dict[str, Path] = {}
    for file in files:
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if key in mapping:
                    raise CheckpointError(f"tensor {key!r} appears in two shards of {path}")
                mapping[key] = file
    return mapping


class Checkpoint:
    """Lazy, read-only access to one checkpoint's tensors and config.

    Shapes and dtypes come from the safetensors headers; a tensor's data is read only by
    :meth:`get`. One ``safe_open`` handle per shard stays open until :meth:`close`.
    """

    def __init__(self, path: Path, ref: str | None = None, revision: str | None = None):
        self.path = Path(path)
        self.ref = ref or str(path)
        self.revision = revision
        config = self.path / "config.json"
        if not config.exists():
            raise CheckpointError(f"{self.path} has no config.json; is it a model folder?")
        self.config: dict = json.loads(config.read_text())
        self._files = _weight_files(self.path)
        self._handles: dict[Path, object] = {}

    @classmethod
    def open(
        cls,
        ref: str,
        revision: str | None = None,
        *,
        allowed_roots: Sequence[str | Path] | None = None,
        token: str | None = None,
    ) -> Checkpoint:
        """Resolve ``ref`` (Hub id or local folder) and open it lazily."""
        path = resolve(ref, revision, allowed_roots=allowed_roots, token=token)
        return cls(path, ref=ref, revision=revision)

    @property
    def commit(self) -> str | None:
        """The Hub commit hash of a downloaded snapshot, or None for a local folder."""
        parent = self.path.parent
        return self.path.name if parent.name == "snapshots" else None

    def _handle(self, key: str):
        try:
            file = self._files[key]
        except KeyError:
            raise KeyError(f"tensor {key!r} is not in {self.ref}") from None
        if file not in self._handles:
            self._handles[file] = safe_open(file, "pt")
        return self._handles[file]

    def keys(self) -> list[str]:
        """Tensor names, grouped by shard (the order that reads them fastest)."""
        return sorted(self._files, key=lambda k: (str(self._files[k]), k))

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        name = self._handle(key).get_slice(key).get_dtype()
        try:
            return SAFETENSORS_DTYPES[name]
        except KeyError:
            raise CheckpointError(f"tensor {key!r} has unsupported dtype {name}") from None

    def nbytes(self, key: str) -> int:
        numel = 1
        for n in self.shape(key):
            numel *= n
        return numel * self.dtype(key).itemsize

    def get(self, key: str) -> torch.Tensor:
        """Load one tensor (CPU, its stored dtype)."""
        return self._handle(key).get_tensor(key)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of one tensor (CPU, stored dtype), read without loading the rest."""
        return self._handle(key).get_slice(key)[start:stop]

    def file_of(self, key: str) -> Path:
        return self._files[key]

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.ref!r}, {len(self._files)} tensors)"
