"""What every microbatch trains on: the coordinator's data, one concept per module.

- ``build``: the run's sources, phase schedule and mixer, from its config (the coordinator,
  the tests' references and the benchmarks build their mixer here, so all train on the same batches).
- ``mixer``: deterministic microbatches from weighted sources under a phase schedule (UL2, then causal).
- ``ul2``: UL2's mixture of denoisers for a decoder-only model (prefix-LM rows, sentinels, mode tokens).
- ``instructions``, ``corpus``: the built-in instruction records and text, on every machine.
- ``tokenizer``: a byte-level BPE trained on the run's data, or a saved one, with UL2's tokens.
- ``batch``: what a microbatch is, and where its samples came from.
- ``accounting``: loss tokens trained by phase, source and objective, kept across restarts.
"""
