"""Models: the M4V transformer (MM-DiT + MM-DiM), the causal video VAE and the text encoders."""

from m4v.models.configs import NAMED_CONFIGS, named_config
from m4v.models.layouts import LAYOUTS, block_mixers
from m4v.models.transformer import M4VTransformer, M4VTransformerOutput
from m4v.models.wan import M4VWanTransformer
from m4v.models.wan_configs import wan_named_config

__all__ = [
    "LAYOUTS",
    "NAMED_CONFIGS",
    "M4VTransformer",
    "M4VTransformerOutput",
    "M4VWanTransformer",
    "block_mixers",
    "named_config",
    "wan_named_config",
]
