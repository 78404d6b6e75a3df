"""The Llama 4 text model: `Llama4Config` (presets scout, maverick, scout-debug, maverick-debug) and
`Llama4ForCausalLM`; checkpoints through `engine.from_pretrained` / `engine.save_pretrained`.
"""

from engine.model.config import Llama4Config
from engine.model.model import Llama4Cache, Llama4ForCausalLM

__all__ = ["Llama4Cache", "Llama4Config", "Llama4ForCausalLM"]
