"""Transfer of a pretrained momrec model to a target domain: full, LoRA, adapter and top-k finetuning.

``python -m finetune --from PRETRAINED_EXPORT --data TARGET_SHARDS --mode lora`` (see ``--help``);
:func:`finetune.export.load_finetuned` reloads a result.
"""

from .export import load_finetuned, save_finetuned
from .transfer import Source, prepare_model

__all__ = ["Source", "load_finetuned", "prepare_model", "save_finetuned"]
