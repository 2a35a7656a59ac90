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
    activations: str  # "static" (calibrated scales), "dynamic" (per-token scales at run time) or "none" (fp16)
    weight_granularity: str  # "tensor" or "channel" (per output channel)
    rules: tuple[str, ...]  # scale rules (presets or PATTERN=OBSERVER, ssmq.quant.rules) for static activations
    rotate_out_proj: bool
    fold_norms: bool
    percentile_taps: tuple[str, ...] = ()  # the taps whose percentile alpha `--alpha` sets
    weight_bits: int = 8  # 4: packed int4 in_proj, x_proj, out_proj, lm_head (docs/numerics.md §7)
    group_size: int = 128  # int4 weights: columns per group scale (one group when K <= group_size)
    gptq_damp: float = 0.01  # int4 weights: GPTQ damping, a fraction of the mean Hessian diagonal
    reorder_heads: bool = False  # Quamba2's head / channel reordering before calibration, on Mamba2 models only

    def percentile_patterns(self, arch: str) -> tuple[str, ...]:
        """The tap patterns `--alpha` sets on an architecture: the SSM input is `conv.out` on Mamba1 and
        `conv.x` on Mamba2 (percentile_taps are written with Mamba1's names)."""
        if arch != "mamba2":
            return self.percentile_taps
        return tuple(t.replace(".conv.out", ".conv.x") for t in self.percentile_taps)

    def with_options(self, alpha: float | None = None, rules: tuple[str, ...] = (), arch: str = "mamba1") -> Recipe:
        """This recipe as it applies to `arch`: `alpha` for its percentile scales (on `arch`'s taps), then extra
        rules (later rules win); head reordering only on Mamba2."""
        extra = tuple(rules)
        if (extra or alpha is not None) and self.activations == "none":
            raise SsmqError(f"recipe {self.name!r} quantizes weights only; --alpha and --rules do not apply")
        if alpha is not None:
            if not self.percentile_taps:
                raise SsmqError(f"recipe {self.name!r} has no percentile scales for --alpha to set; use --rules")
            extra = tuple(f"{tap}=percentile(alpha={alpha})" for tap in self.percentile_patterns(arch)) + extra
        if extra and self.activations == "dynamic":
            raise SsmqError(f"recipe {self.name!r} computes scales at run time; --alpha and --rules do not apply")
        return replace(self, rules=self.rules + extra, reorder_heads=self.reorder_heads and arch == "mamba2")

    @property
    def transforms(self) -> tuple[str, ...]:
        """Names of the fp-equivalent transforms applied before calibration, in order."""
        steps = (("fold_norms", self.fold_norms), ("reorder_heads", self.reorder_heads),
                 ("rotate_out_proj", self.rotate_out_proj))
        return tuple(n for n, on in steps if on)


RECIPES: dict[str, Recipe] = {
    "quamba1": Recipe(
        "quamba1", "Quamba W8A8: static per-tensor scales, percentile on conv.out and ssm.state, "
        "Hadamard-rotated out_proj input, norm weights folded into in_proj (Mamba2: conv.x is the SSM input; "
        "every in_proj segment and conv output one scale per tensor)",
        ("mamba1", "mamba2"), "static", "tensor", ("quamba1",), rotate_out_proj=True, fold_norms=True,
        percentile_taps=("layers.*.conv.out", "layers.*.ssm.state")),
    "minmax-static": Recipe(
        "minmax-static", "W8A8 baseline: the same int8 ops with static min-max scales everywhere, no rotation",
        ("mamba1", "mamba2"), "static", "tensor", ("minmax",), rotate_out_proj=False, fold_norms=False),
    "dynamic": Recipe(
        "dynamic", "W8A8 baseline: per-token dynamic activation scales computed at run time, per-channel weights",
        ("mamba1",), "dynamic", "channel", (), rotate_out_proj=False, fold_norms=False),
    "quamba2-w8a8": Recipe(
        "quamba2-w8a8", "Quamba2 W8A8 for Mamba2: heads and channels reordered (sort and cluster), conv.x scales "
        "per [SSD group, head group, channel group], B / C per SSD group, state per SSD group and state index, "
        "per-channel int8 weights, Hadamard-rotated out_proj input, norm weights folded into in_proj. Mamba1 has "
        "no heads to group: use quamba1 there", ("mamba2",), "static", "channel", ("quamba2",),
        rotate_out_proj=True, fold_norms=True, reorder_heads=True),
    "quamba2-w4a8": Recipe(
        "quamba2-w4a8", "Quamba2 W4A8: int4 GPTQ weights (group 128, two-level scales) for in_proj, out_proj and "
        "lm_head, int4 round-to-nearest x_proj (Mamba1), int8 dt_proj and conv; static int8 activations with the "
        "architecture's preset (quamba1; Mamba2: quamba2's grouped scales after head reordering, as quamba2-w8a8)",
        ("mamba1", "mamba2"), "static", "channel", (), rotate_out_proj=True, fold_norms=True,
        percentile_taps=("layers.*.conv.out", "layers.*.ssm.state"), weight_bits=4, reorder_heads=True),
    "quamba2-w4a16": Recipe(
        "quamba2-w4a16", "Quamba2 W4A16: int4 GPTQ weights (group 128, fp32 group scales) for in_proj, out_proj "
        "and lm_head, int4 round-to-nearest x_proj (Mamba1); fp16 activations (weight-only), Hadamard-rotated "
        "out_proj", ("mamba1", "mamba2"), "none", "channel", (), rotate_out_proj=True, fold_norms=True, weight_bits=4),
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
