"""The model families the builder and the conversion know, one mapping table each (``llama.py``, ``qwen2.py``).

Adding a family is adding its table (``table.ModelFamily``) here and its tests; the builder refuses a Hugging Face
config whose ``architectures`` or ``model_type`` is not registered, naming the field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nemo_logitavg.models.families.llama import LLAMA
from nemo_logitavg.models.families.qwen2 import QWEN2
from nemo_logitavg.models.families.table import ModelFamily

if TYPE_CHECKING:  # the builder imports this module: the config class is named for type hints only
    from nemo_logitavg.models.builder import LlamaConfig

# Hugging Face model_type -> its family, in the order error messages list them.
FAMILIES: dict[str, ModelFamily] = {family.model_type: family for family in (LLAMA, QWEN2)}


def family_of(cfg: LlamaConfig) -> ModelFamily:
    """The mapping table of ``cfg``'s family (``cfg.model_type``)."""
    return FAMILIES[cfg.model_type]
