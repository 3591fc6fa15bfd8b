"""What crosses the wire compressed, one module each, layered downward.

- ``quantization``: blockwise 2/4/8-bit quantizers with packed storage (bitsandbytes' 8-bit and
  NF4 maps, our own 2-bit and stochastic grids); every other module builds on it.
- ``aqsgd``: AQ-SGD's per-sample activation caches (sender and receiver kept bit-identical),
  bounded in memory, spilled to disk.
- ``boundary``: what a FORWARD or BACKWARD frame carries per the run's settings (plain, direct
  quantization or AQ-SGD; quantized activation gradients; lossless packing of the extras), and
  the one place such a frame is decoded and validated.
- ``cocktail``: CocktailSGD's compression of a flat vector for replica sync (shared random
  subset, top-k, low-bit values).
"""
