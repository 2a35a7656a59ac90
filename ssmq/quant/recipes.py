"""Quantization recipes: small declarative configs, applied by one call (`ssmq.quantize`).

A recipe says which architectures it applies to, how activations are quantized (static scales from
calibration, or dynamic per-token scales), the weight granularity, which observer feeds each static
scale (scale rules, later ones override earlier ones), and the fp-equivalent transforms applied
before calibration (Hadamard rotation of the out_proj input, norm weights folded into in_proj).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ssmq.errors import SsmqError


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    archs: tuple[str, ...]
    activations: str  # "static" (calibrated scales) or "dynamic" (per-token scales at run time)
    weight_granularity: str  # "tensor" or "channel" (per output channel)
    rules: tuple[str, ...]  # scale rules for static activations
    rotate_out_proj: bool
    fold_norms: bool

    def with_options(self, alpha: float | None = None, rules: tuple[str, ...] = ()) -> Recipe:
        """This recipe with every percentile rule's alpha replaced by `alpha`, then extra rules appended."""
        base = self.rules
        if alpha is not None:
            base = tuple(r.split("=", 1)[0] + f"=percentile(alpha={alpha})" if "percentile" in r else r for r in base)
        return replace(self, rules=base + tuple(rules))


QUAMBA1_RULES = ("*=minmax", "layers.*.conv.out=percentile(alpha=0.9995)", "layers.*.ssm.state=percentile(alpha=0.9995)")

RECIPES: dict[str, Recipe] = {
    "quamba1": Recipe(
        "quamba1", "Quamba W8A8: static per-tensor scales, percentile on conv.out and ssm.state, "
        "Hadamard-rotated out_proj input, norm weights folded into in_proj",
        ("mamba1",), "static", "tensor", QUAMBA1_RULES, rotate_out_proj=True, fold_norms=True),
    "minmax-static": Recipe(
        "minmax-static", "W8A8 baseline: the same int8 ops with static min-max scales everywhere, no rotation",
        ("mamba1",), "static", "tensor", ("*=minmax",), rotate_out_proj=False, fold_norms=False),
    "dynamic": Recipe(
        "dynamic", "W8A8 baseline: per-token dynamic activation scales computed at run time, per-channel weights",
        ("mamba1",), "dynamic", "channel", (), rotate_out_proj=False, fold_norms=False),
}


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`; an error listing the known ones otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise SsmqError(f"unknown recipe {name!r}; available: {', '.join(RECIPES)}") from None


def check_arch(recipe: Recipe, arch: str) -> None:
    """Refuse to apply a recipe to an architecture it was not written for."""
    if arch not in recipe.archs:
        raise SsmqError(f"recipe {recipe.name!r} applies to {', '.join(recipe.archs)} models only; "
                        f"this model is {arch}")
