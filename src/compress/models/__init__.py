"""Everything that knows about Hugging Face architectures: loading, Conv1D conversion, finding blocks and layers,
where the residual stream is read and written (``rotation``).

Passes never import transformers; they get ``nn.Linear`` modules and names chosen here. Names are resolved
lazily so that importing ``compress.models`` (or a sibling package) does not pull in transformers until a
function is actually used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "convert_conv1d_to_linear": "blocks",
    "find_blocks": "blocks",
    "find_linears": "blocks",
    "plan_layers": "blocks",
    "select_layers": "blocks",
    "DEMO_MODEL_DIR": "load",
    "LoadedModel": "load",
    "load_config": "load",
    "load_model": "load",
    "load_tokenizer": "load",
    "model_kind": "load",
    "resolve_model_source": "load",
    "rotation_layout": "rotation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
