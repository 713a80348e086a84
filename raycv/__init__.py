"""raycv: distributed training of vision models on Ray."""

import logging

__version__ = "0.1.0"

# torchao (int8 quantization) registers an enum with torch's pytree on import, which torch
# 2.14 answers with a deprecation warning in every process; nothing a raycv user can act on.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
