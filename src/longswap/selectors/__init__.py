"""Learned block selectors: the parameters a pattern such as ``learned_topk`` scores with.

Patterns stay pure definitions; a pattern that selects by learned scores declares it
(``needs_selector``), and the swap gives each of its attention modules a selector module
(:class:`BlockGate`) under ``longswap_selector``, so that ``state_dict``, PEFT and saving
see its parameters like any other. ``distill`` holds what trains them: dense attention
pooled to key blocks, computed chunk by chunk, and the KL divergence to it.
"""

from longswap.io import SELECTOR_ATTR, SELECTOR_FILE
from longswap.selectors.distill import captured_mass, dense_block_mass, selector_kl
from longswap.selectors.gate import BlockGate

__all__ = [
    "SELECTOR_ATTR",
    "SELECTOR_FILE",
    "BlockGate",
    "captured_mass",
    "dense_block_mass",
    "selector_kl",
]
