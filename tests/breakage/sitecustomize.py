"""Loaded at start-up by every Python process that has this folder on PYTHONPATH (tests put it there).

With HOMETRAIN_TEST_BREAK_BLOCKS_FROM=N set, GPT-J blocks from index N on raise what every stage
forward raised under transformers 5.24 before the stage model passed rotary embeddings: a stage
that fails on every microbatch, in a real peer process. Without the variable it does nothing.
"""

import os

_first_broken = os.environ.get("HOMETRAIN_TEST_BREAK_BLOCKS_FROM")
if _first_broken is not None:
    from transformers.models.gptj import modeling_gptj

    _forward = modeling_gptj.GPTJBlock.forward

    def _broken_forward(self, *args, **kwargs):
        if self.attn.layer_idx >= int(_first_broken):
            raise TypeError("cannot unpack non-iterable NoneType object")
        return _forward(self, *args, **kwargs)

    modeling_gptj.GPTJBlock.forward = _broken_forward
