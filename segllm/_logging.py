"""Logging settings applied when the package is imported (before any third-party import)."""

import logging

# peft imports bitsandbytes where it is installed (segllm[quant]); on CPUs with AVX512-BF16 that
# warns that an optional kernel from the Hugging Face hub is missing. We never download it (its
# plain CPU path serves), so the warning is noise on every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
