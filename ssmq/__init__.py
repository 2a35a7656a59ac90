"""ssmq: post-training quantization of Mamba selective state-space language models.

Each CLI command has a Python twin here: `load`/`save` (info), `generate`, `calibrate`, `quantize`,
`evaluate_ppl`, and the scale tools `list_scales`, `explain_scale`, `analyze_scales`, `set_scales`,
`derive_scales`, `diff_scales`, `sweep_alpha`.
"""

__version__ = "0.1.0"

from ssmq.api import load, save  # noqa: E402
from ssmq.eval.generate import generate  # noqa: E402
from ssmq.eval.perplexity import evaluate_ppl  # noqa: E402
from ssmq.models.config import MambaConfig  # noqa: E402
from ssmq.models.lm import MambaLM, build_model  # noqa: E402
from ssmq.quant.analyze import analyze_scales  # noqa: E402
from ssmq.quant.calibrate import calibrate  # noqa: E402
from ssmq.quant.edit import derive_scales, set_scales  # noqa: E402
from ssmq.quant.inspect import diff_scales, explain_scale, list_scales  # noqa: E402
from ssmq.quant.qmodel import QuantizedMambaLM, load_quantized, save_quantized  # noqa: E402
from ssmq.quant.quantize import calibrate_for_recipe, quantize  # noqa: E402
from ssmq.quant.sweep import sweep_alpha  # noqa: E402

__all__ = ["MambaConfig", "MambaLM", "QuantizedMambaLM", "__version__", "analyze_scales", "build_model",
           "calibrate", "calibrate_for_recipe", "derive_scales", "diff_scales", "evaluate_ppl", "explain_scale",
           "generate", "list_scales", "load", "load_quantized", "quantize", "save", "save_quantized",
           "set_scales", "sweep_alpha"]
