"""Text generation with the decoding cache: one prefill, then one token per step."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from ssmq.errors import SsmqError
from ssmq.models.lm import MambaLM
from ssmq.models.tokenizer import EOS_TOKEN


@dataclass
class Generation:
    """What `generate` produced, with its timings."""

    prompt: str
    text: str
    prompt_ids: list[int]
    new_ids: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        steps = max(len(self.new_ids) - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy when temperature is 0; otherwise nucleus sampling from softmax(logits / temperature)."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _validate(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 0:
        raise SsmqError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise SsmqError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise SsmqError(f"top_p must be in (0, 1], got {top_p}")


@torch.no_grad()
def generate(model: MambaLM, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
             on_text: Callable[[str], None] | None = None) -> Generation:
    """Continue `prompt`; `on_text` receives each new piece of text as soon as it is decodable."""
    _validate(max_new_tokens, temperature, top_p)
    if tokenizer is None:
        raise SsmqError("generation needs a tokenizer: pass --tokenizer PATH (e.g. the GPT-NeoX tokenizer)")
    prompt_ids = tokenizer.encode(prompt).ids
    if not prompt_ids:
        raise SsmqError("the prompt encodes to no tokens; give a non-empty prompt")
    eos = tokenizer.token_to_id(EOS_TOKEN) if stop_at_eos else None
    generator = torch.Generator().manual_seed(seed)
    out = Generation(prompt=prompt, text="", prompt_ids=prompt_ids)
    cache = model.new_cache()
    ids = torch.tensor([prompt_ids], device=model.device)
    emitted = ""
    start = time.perf_counter()
    for step in range(max_new_tokens):
        logits = model(ids, cache)[0, -1]
        token = sample_next(logits, temperature, top_p, generator)
        if step == 0:
            out.prefill_seconds = time.perf_counter() - start
            start = time.perf_counter()
        if token == eos:
            break
        out.new_ids.append(token)
        text = tokenizer.decode(out.new_ids)
        if not text.endswith("\ufffd") and len(text) > len(emitted):
            if on_text is not None:
                on_text(text[len(emitted):])
            emitted = text
        ids = torch.tensor([[token]], device=model.device)
    out.decode_seconds = time.perf_counter() - start if out.new_ids else 0.0
    out.text = tokenizer.decode(out.new_ids)
    if on_text is not None and len(out.text) > len(emitted):
        on_text(out.text[len(emitted):])
    return out
