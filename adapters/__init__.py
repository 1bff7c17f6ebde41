"""Adapter files, model families and the runtime that applies adapters; imports neither `trainer` nor `app`.

Importing it drops one library notice: transformers 5 says "`CLIPImageProcessor` requires torchvision (not
installed); falling back to `CLIPImageProcessorPil`" when diffusers' pipelines import, on every run of a machine
without torchvision. The fallback is what this project uses (it does not depend on torchvision), so the notice only
tells a person to install something they do not need.
"""

import logging


class _NoTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())
