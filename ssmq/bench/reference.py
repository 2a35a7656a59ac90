"""transformers' MambaForCausalLM (fp16, its own reference code path) timed on the same shape."""

from __future__ import annotations

import importlib.util

import torch

from ssmq.bench.timing import median_ms
from ssmq.models.config import MambaConfig

HF_PROMPT = 16  # its prefill loops over the sequence in Python, so decoding is timed after a short prompt


def transformers_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def transformers_model(cfg: MambaConfig, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised fp16 MambaForCausalLM of shape `cfg`, built on `device`."""
    from transformers import MambaConfig as HFMambaConfig
    from transformers import MambaForCausalLM

    raw = {k: v for k, v in cfg.to_transformers().items() if k not in ("architectures", "model_type")}
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            return MambaForCausalLM(HFMambaConfig(**raw)).eval()
    finally:
        torch.set_default_dtype(default)


@torch.no_grad()
def transformers_tpot_ms(model: torch.nn.Module, batch: int, steps: int, repeats: int) -> float:
    """Milliseconds per generated token of `model.generate` (greedy): the difference between generating
    2 + steps and 2 tokens after the same prompt, over `steps`, so prefill and fixed costs cancel."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, HF_PROMPT), device=device)

    def generate(n: int) -> None:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)

    short = median_ms(lambda: generate(2), device, repeats)
    long = median_ms(lambda: generate(2 + steps), device, repeats)
    return (long - short) / steps
