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
    rules: tuple[str, ...]  # scale rules (presets or PATTERN=OBSERVER, ssmq.quant.rules) for static activations
    rotate_out_proj: bool
    fold_norms: bool
    percentile_taps: tuple[str, ...] = ()  # the taps whose percentile alpha `--alpha` sets

    def with_options(self, alpha: float | None = None, rules: tuple[str, ...] = ()) -> Recipe:
        """This recipe with `alpha` for its percentile scales, then extra rules (later rules win)."""
        extra = tuple(rules)
        if alpha is not None:
            if not self.percentile_taps:
                raise SsmqError(f"recipe {self.name!r} has no percentile scales for --alpha to set; use --rules")
            extra = tuple(f"{tap}=percentile(alpha={alpha})" for tap in self.percentile_taps) + extra
        if extra and self.activations == "dynamic":
            raise SsmqError(f"recipe {self.name!r} computes scales at run time; --alpha and --rules do not apply")
        return replace(self, rules=self.rules + extra)

    @property
    def transforms(self) -> tuple[str, ...]:
        """Names of the fp-equivalent transforms applied before calibration, in order."""
        return tuple(n for n, on in (("fold_norms", self.fold_norms), ("rotate_out_proj", self.rotate_out_proj)) if on)


RECIPES: dict[str, Recipe] = {
    "quamba1": Recipe(
        "quamba1", "Quamba W8A8: static per-tensor scales, percentile on conv.out and ssm.state, "
        "Hadamard-rotated out_proj input, norm weights folded into in_proj",
        ("mamba1",), "static", "tensor", ("quamba1",), rotate_out_proj=True, fold_norms=True,
        percentile_taps=("layers.*.conv.out", "layers.*.ssm.state")),
    "minmax-static": Recipe(
        "minmax-static", "W8A8 baseline: the same int8 ops with static min-max scales everywhere, no rotation",
        ("mamba1",), "static", "tensor", ("minmax",), rotate_out_proj=False, fold_norms=False),
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
