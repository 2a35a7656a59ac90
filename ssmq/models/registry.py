"""Built-in model names (the trained fixture models shipped with ssmq) and MODEL argument resolution."""

from __future__ import annotations

from pathlib import Path

from ssmq.errors import CheckpointError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
BUILTIN_MODELS = {
    "tiny-mamba1": FIXTURES / "tiny-mamba1",
    "tiny-mamba2": FIXTURES / "tiny-mamba2",
}


def resolve_model_dir(model: str | Path) -> Path:
    """A local directory as given, or the directory of a built-in name; an error naming both options."""
    path = Path(model)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a model directory (a file was given)")
        return path
    if str(model) in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[str(model)]
        if not (builtin / "config.json").is_file():
            raise CheckpointError(f"built-in model {model!r} is missing from this installation ({builtin})")
        return builtin
    raise CheckpointError(f"{model}: no such directory, and not a built-in model "
                          f"(built-in: {', '.join(BUILTIN_MODELS)})")
