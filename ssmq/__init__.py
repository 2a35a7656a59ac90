"""ssmq: post-training quantization of Mamba selective state-space language models."""

__version__ = "0.1.0"

from ssmq.api import load, save  # noqa: E402
from ssmq.eval.generate import generate  # noqa: E402
from ssmq.models.config import MambaConfig  # noqa: E402
from ssmq.models.lm import MambaLM, build_model  # noqa: E402

__all__ = ["MambaConfig", "MambaLM", "build_model", "generate", "load", "save", "__version__"]
