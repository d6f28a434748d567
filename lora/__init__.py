"""LoRA for quantized Wan: file reading and key styles → native targets (``keys``), merging into
quantized weights and the ``merge-lora`` writer (``merge``, ``cli``), and the low-rank side path
that keeps the quantized kernels on (``side``). Imports ``loaders`` and ``ops`` downward only;
no ComfyUI import."""
