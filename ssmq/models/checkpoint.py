"""Reading and writing fp model directories (transformers and mamba_ssm layouts).

Loading is strict: a missing, extra or mis-shaped tensor is an error that names it. Writing is
atomic: files go to a temporary directory beside the target, which is renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ssmq.errors import CheckpointError
from ssmq.models.config import MambaConfig, read_config
from ssmq.models.lm import MambaLM

log = logging.getLogger(__name__)

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
_MAMBA_SSM_RENAMES = {"backbone.embedding.weight": "backbone.embeddings.weight"}


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: weights file is missing") from None
    except Exception as exc:  # safetensors raises several types for a bad header or short file
        raise CheckpointError(f"{path}: corrupt or truncated weights file ({exc})") from None


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model directory: single or sharded safetensors, or pytorch_model.bin."""
    directory = Path(directory)
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: unreadable shard index ({exc})") from None
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(_load_safetensors(directory / shard))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{index}: tensor {missing[0]!r} is listed but absent from its shard")
        return tensors
    if (directory / SAFETENSORS).is_file():
        return _load_safetensors(directory / SAFETENSORS)
    if (directory / TORCH_BIN).is_file():
        path = directory / TORCH_BIN
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle and zip errors for a bad or truncated file
            raise CheckpointError(f"{path}: corrupt or truncated weights file ({exc})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
        return state
    raise CheckpointError(f"{directory}: no weights file (expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN})")


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """Raise a CheckpointError naming the first missing, extra or mis-shaped tensor."""
    missing = [k for k in expected if k not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r}{more}")
    extra = [k for k in found if k not in expected]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{source}: unexpected tensor {extra[0]!r}{more}")
    for key, ref in expected.items():
        if tuple(found[key].shape) != tuple(ref.shape):
            raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(found[key].shape)}, "
                                  f"expected {tuple(ref.shape)}")


def _normalize_keys(state: dict[str, torch.Tensor], cfg: MambaConfig) -> dict[str, torch.Tensor]:
    state = {_MAMBA_SSM_RENAMES.get(k, k): v for k, v in state.items()}
    if cfg.tie_embeddings and "lm_head.weight" in state:
        head = state.pop("lm_head.weight")
        emb = state.get("backbone.embeddings.weight")
        if emb is not None and head.shape != emb.shape:
            raise CheckpointError(f"tied lm_head.weight has shape {tuple(head.shape)}, "
                                  f"embedding has {tuple(emb.shape)}")
    return state


def expected_tensors(model: MambaLM) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint of `model` holds (a tied lm_head is stored once, as the embedding; so are
    the row scales of an int8 table that the embedding and lm_head share)."""
    state = model.state_dict()
    head, emb = model.lm_head, model.backbone.embeddings
    if head.weight is emb.weight:
        state.pop("lm_head.weight", None)
        scale = getattr(head, "weight_scale", None)
        if scale is not None and scale is getattr(emb, "weight_scale", None):
            state.pop("lm_head.weight_scale", None)
    return state


def load_model(directory: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> MambaLM:
    """Load an fp model directory. dtype defaults to the stored dtype of the embedding."""
    directory = Path(directory)
    cfg = read_config(directory)
    state = _normalize_keys(read_state_dict(directory), cfg)
    with torch.device("meta"):
        model = MambaLM(cfg)
    check_state_dict(expected_tensors(model), state, str(directory))
    target = dtype or state["backbone.embeddings.weight"].dtype
    if not target.is_floating_point:
        raise CheckpointError(f"{directory}: embedding dtype {target} is not a floating-point type")
    model.load_state_dict({k: v.to(target) for k, v in state.items()}, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    return model.to(device).eval()


def check_output_dir(target: Path, overwrite: bool = False) -> None:
    """Refuse an existing non-empty output unless `overwrite` (call before long work, not only at the end)."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise CheckpointError(f"{target}: output exists and is not empty (pass --overwrite to replace it)")


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it replaces `target`, on error it is removed.

    An existing non-empty `target` is refused unless `overwrite`."""
    target = Path(target)
    check_output_dir(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(model: MambaLM, directory: Path, tokenizer_file: Path | None = None, overwrite: bool = False,
               extra: Callable[[Path], None] | None = None) -> Path:
    """Write `model` as a transformers-layout directory (config.json, model.safetensors, tokenizer.json).

    `extra(tmpdir)` may add files before the directory is moved into place."""
    with atomic_directory(Path(directory), overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(model.config.to_transformers(), indent=2) + "\n")
        tensors = {k: v.detach().cpu().contiguous() for k, v in expected_tensors(model).items()}
        save_file(tensors, str(tmp / SAFETENSORS), metadata={"format": "pt"})
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        if extra is not None:
            extra(tmp)
    log.info("saved model to %s", directory)
    return Path(directory)


def state_dict_sha256(model: torch.nn.Module) -> str:
    """A content hash of the model's tensors (names, dtypes, shapes, bytes), independent of file format."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
