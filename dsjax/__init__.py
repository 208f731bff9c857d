"""dsjax: DeepSeek V3.2 (and V3 / V3.1 / R1) in functional JAX.

Public API:
    Config, init_params, forward, forward_with_aux, mtp_logits, param_axes, abstract_params, Parallelism
"""

from dsjax.config import Config, RopeScaling
from dsjax.model import Aux, forward, forward_with_aux, lm_head
from dsjax.mtp import mtp_logits
from dsjax.parallel import Parallelism
from dsjax.params import abstract_params, count_params, init_params, param_axes, param_specs

__all__ = [
    "Config", "RopeScaling", "init_params", "forward", "forward_with_aux", "lm_head", "mtp_logits",
    "param_axes", "param_specs", "abstract_params", "count_params", "Aux", "Parallelism",
]
__version__ = "0.1.0"

# Inference. `dsjax.generate` is the function; its module's other names: `from dsjax.generate import ...`.
from dsjax.generate import GenerationResult, generate, generate_with_stats  # noqa: E402
from dsjax.tokenizer import Tokenizer  # noqa: E402

__all__ += ["generate", "generate_with_stats", "GenerationResult", "Tokenizer"]
