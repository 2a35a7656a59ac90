"""Architecture description of a Mamba1 or Mamba2 language model, read from either checkpoint layout.

Two layouts exist in the wild: the transformers one (`model_type`, `hidden_size`,
`num_hidden_layers`, ...) and the mamba_ssm one (`d_model`, `n_layer`, `ssm_cfg`, ...).
Both are parsed into one `MambaConfig`; ssmq always writes the transformers layout.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ssmq.errors import ConfigError

ARCHITECTURES = ("mamba1", "mamba2")


@dataclass
class MambaConfig:
    """Shapes and options of a Mamba language model. `vocab_size` is the embedding's row count
    (already padded to `pad_vocab_size_multiple`)."""

    arch: str = "mamba1"
    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50280
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # 0 means ceil(d_model / 16); Mamba1 only
    conv_bias: bool = True
    proj_bias: bool = False
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    pad_vocab_size_multiple: int = 1
    # Mamba2 only
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    dt_limit: tuple[float, float] = (0.0, math.inf)
    # initialisation of dt (used for random and freshly trained models)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"unknown architecture {self.arch!r}; ssmq supports {', '.join(ARCHITECTURES)}")
        if self.dt_rank in (0, "auto", None):
            self.dt_rank = math.ceil(self.d_model / 16)
        self.dt_limit = (float(self.dt_limit[0]), float(self.dt_limit[1]))
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "dt_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config value {name}={value!r} must be a positive integer")
        if self.arch == "mamba2":
            if self.d_inner % self.headdim:
                raise ConfigError(f"d_inner {self.d_inner} is not a multiple of headdim {self.headdim}")
            if self.nheads % self.ngroups:
                raise ConfigError(f"nheads {self.nheads} is not a multiple of ngroups {self.ngroups}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv1d: x for Mamba1, x|B|C for Mamba2."""
        if self.arch == "mamba1":
            return self.d_inner
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def in_proj_dim(self) -> int:
        if self.arch == "mamba1":
            return 2 * self.d_inner
        return self.d_inner + self.conv_dim + self.nheads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_transformers(self) -> dict[str, Any]:
        """The config.json ssmq writes: the transformers layout, readable by transformers too."""
        common = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "state_size": self.d_state,
            "num_hidden_layers": self.n_layer,
            "layer_norm_epsilon": self.norm_eps,
            "expand": self.expand,
            "conv_kernel": self.d_conv,
            "use_bias": self.proj_bias,
            "use_conv_bias": self.conv_bias,
            "hidden_act": "silu",
            "residual_in_fp32": self.residual_in_fp32,
            "time_step_min": self.dt_min,
            "time_step_max": self.dt_max,
            "time_step_floor": self.dt_init_floor,
            "tie_word_embeddings": self.tie_embeddings,
            "pad_token_id": 0,
            "bos_token_id": 0,
            "eos_token_id": 0,
        }
        if self.arch == "mamba1":
            return {"architectures": ["MambaForCausalLM"], "model_type": "mamba",
                    "time_step_rank": self.dt_rank, **common}
        limit = [self.dt_limit[0], self.dt_limit[1] if math.isfinite(self.dt_limit[1]) else float("inf")]
        return {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", "num_heads": self.nheads,
                "head_dim": self.headdim, "n_groups": self.ngroups, "chunk_size": self.chunk_size,
                "time_step_limit": limit, **common}


def _get(raw: dict[str, Any], key: str, default: Any, source: str) -> Any:
    value = raw.get(key, default)
    if value is _REQUIRED:
        raise ConfigError(f"{source}: missing required key {key!r}")
    return value


_REQUIRED = object()


def _from_transformers(raw: dict[str, Any], source: str) -> MambaConfig:
    model_type = raw.get("model_type", "mamba")
    if model_type not in ("mamba", "mamba2"):
        raise ConfigError(f"{source}: unknown architecture model_type={model_type!r}; expected 'mamba' or 'mamba2'")
    arch = "mamba1" if model_type == "mamba" else "mamba2"
    kw: dict[str, Any] = dict(
        arch=arch,
        d_model=_get(raw, "hidden_size", _REQUIRED, source),
        n_layer=_get(raw, "num_hidden_layers", _REQUIRED, source),
        vocab_size=_get(raw, "vocab_size", _REQUIRED, source),
        d_state=raw.get("state_size", 16 if arch == "mamba1" else 128),
        d_conv=raw.get("conv_kernel", 4),
        expand=raw.get("expand", 2),
        conv_bias=raw.get("use_conv_bias", True),
        proj_bias=raw.get("use_bias", False),
        norm_eps=raw.get("layer_norm_epsilon", 1e-5),
        residual_in_fp32=raw.get("residual_in_fp32", True),
        tie_embeddings=raw.get("tie_word_embeddings", arch == "mamba1"),
        dt_min=raw.get("time_step_min", 0.001),
        dt_max=raw.get("time_step_max", 0.1),
        dt_init_floor=raw.get("time_step_floor", 1e-4),
    )
    if arch == "mamba1":
        kw["dt_rank"] = raw.get("time_step_rank", "auto")
    else:
        kw.update(headdim=raw.get("head_dim", 64), ngroups=raw.get("n_groups", 1),
                  chunk_size=raw.get("chunk_size", 256),
                  dt_limit=tuple(raw.get("time_step_limit", (0.0, math.inf))))
        heads = raw.get("num_heads")
        if heads is not None and heads * kw["headdim"] != kw["expand"] * kw["d_model"]:
            raise ConfigError(f"{source}: num_heads*head_dim ({heads}*{kw['headdim']}) != "
                              f"expand*hidden_size ({kw['expand']}*{kw['d_model']})")
    return MambaConfig(**kw)


def _from_mamba_ssm(raw: dict[str, Any], source: str) -> MambaConfig:
    ssm = dict(raw.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise ConfigError(f"{source}: unknown architecture ssm_cfg.layer={layer!r}; expected 'Mamba1' or 'Mamba2'")
    if raw.get("attn_layer_idx") or raw.get("d_intermediate", 0):
        raise ConfigError(f"{source}: hybrid models (attention layers or MLPs, d_intermediate > 0) are not supported")
    if not raw.get("rms_norm", True):
        raise ConfigError(f"{source}: rms_norm=false (LayerNorm blocks) is not supported")
    arch = "mamba1" if layer == "Mamba1" else "mamba2"
    vocab = _get(raw, "vocab_size", _REQUIRED, source)
    multiple = int(raw.get("pad_vocab_size_multiple", 1) or 1)
    padded = vocab if vocab % multiple == 0 else vocab + multiple - vocab % multiple
    kw: dict[str, Any] = dict(
        arch=arch,
        d_model=_get(raw, "d_model", _REQUIRED, source),
        n_layer=_get(raw, "n_layer", _REQUIRED, source),
        vocab_size=padded,
        pad_vocab_size_multiple=multiple,
        d_state=ssm.get("d_state", 16 if arch == "mamba1" else 128),
        d_conv=ssm.get("d_conv", 4),
        expand=ssm.get("expand", 2),
        conv_bias=ssm.get("conv_bias", True),
        proj_bias=ssm.get("bias", False),
        norm_eps=raw.get("norm_epsilon", 1e-5),
        residual_in_fp32=raw.get("residual_in_fp32", True),
        tie_embeddings=raw.get("tie_embeddings", True),
        dt_min=ssm.get("dt_min", 0.001),
        dt_max=ssm.get("dt_max", 0.1),
        dt_init_floor=ssm.get("dt_init_floor", 1e-4),
    )
    if arch == "mamba1":
        kw["dt_rank"] = ssm.get("dt_rank", "auto")
    else:
        d_inner = kw["expand"] * kw["d_model"]
        if ssm.get("d_ssm") not in (None, d_inner):
            raise ConfigError(f"{source}: ssm_cfg.d_ssm != d_inner is not supported")
        if ssm.get("D_has_hdim", False) or not ssm.get("rmsnorm", True) or ssm.get("norm_before_gate", False):
            raise ConfigError(f"{source}: Mamba2 variants with D_has_hdim, rmsnorm=false or norm_before_gate "
                              "are not supported")
        kw.update(headdim=ssm.get("headdim", 64), ngroups=ssm.get("ngroups", 1),
                  chunk_size=ssm.get("chunk_size", 256), dt_limit=tuple(ssm.get("dt_limit", (0.0, math.inf))))
    return MambaConfig(**kw)


def parse_config(raw: dict[str, Any], source: str = "config.json") -> MambaConfig:
    """Parse a config dict of either layout. `source` names the file in error messages."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    try:
        if "d_model" in raw:
            return _from_mamba_ssm(raw, source)
        if "hidden_size" in raw or "model_type" in raw:
            return _from_transformers(raw, source)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from None
    raise ConfigError(f"{source}: not a Mamba config (no 'hidden_size' or 'd_model' key)")


def read_config(directory: Path) -> MambaConfig:
    """Read and parse `directory/config.json`."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{directory}: not a model directory (no config.json)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable config ({exc})") from None
    return parse_config(raw, str(path))
