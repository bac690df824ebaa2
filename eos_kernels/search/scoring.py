"""Fast exact-match scoring of Θ configurations by one teacher-forced forward (for tuning, not reporting).

Greedy generation is exact-match correct when every answer token (and the
end-of-turn token the answer is labelled with) is the argmax of its logits
given the gold prefix: then generation produces exactly the gold answer and
stops. One teacher-forced forward per batch checks that for every answer at
once, where generation needs one forward per new token. It is a proxy of
:func:`~eos_kernels.search.evaluate.evaluate`'s accuracy (which compares text
after normalisation, and rates the visual tokens with each turn's own prompt)
and equals it on single-turn data whose answers tokenise one way; the demo
uses it to *choose* baseline placements on the search split, and reports only
``evaluate``'s greedy accuracy on the held-out split.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["ScoringBatches", "exact_match_accuracy"]


class ScoringBatches:
    """Collated batches of ``data`` (a :class:`~eos_kernels.search.data.Dataset`) built once, on ``device``
    in ``dtype``: every configuration is scored on the very same tensors."""

    def __init__(self, data, indices: Sequence[int], batch_size: int, device, dtype):
        indices = list(indices)
        if not indices:
            raise ValueError("indices: no example to score")
        self.batches = [data.collate(indices[s:s + batch_size]).to(device, dtype)
                        for s in range(0, len(indices), batch_size)]
        self.turns = [[data.examples[i].turns for i in indices[s:s + batch_size]]
                      for s in range(0, len(indices), batch_size)]
        self.answers = sum(len(t) for chunk in self.turns for t in chunk)

    def __len__(self) -> int:
        return self.answers


@torch.no_grad()
def exact_match_accuracy(model, batches: ScoringBatches, theta, adapter=None) -> float:
    """Share of answers whose tokens are all the argmax under teacher forcing, with ``model`` patched by
    ``theta`` for the call (the prompt alone rates the visual tokens, as in ``generate``)."""
    from eos_kernels.integrations.auto import adapter_for
    from eos_kernels.patching import patch_model, prompt_lengths, unpatch_model
    from eos_kernels.search.objective import _answer_positions, forward_inputs

    adapter = adapter or adapter_for(model)
    patch_model(model, theta, adapter)
    correct = 0
    try:
        for batch, turns in zip(batches.batches, batches.turns):
            # logits only where an answer token is predicted (the labels hold the answers' ids: a turn's span),
            # not a [B, L, vocabulary] tensor; a position outside them counts as a miss
            keep = _answer_positions(batch.labels)
            with prompt_lengths(model, batch.prompt_lengths):
                logits = model(**forward_inputs(model, batch), use_cache=False, logits_to_keep=keep).logits
            hit = torch.zeros(batch.input_ids.shape[0], batch.input_ids.shape[1] - 1, dtype=torch.bool,
                              device=logits.device)
            hit[:, keep] = logits.argmax(-1) == batch.input_ids[:, keep + 1]
            for b, sample_turns in enumerate(turns):
                for start, end in sample_turns:
                    correct += bool(hit[b, start - 1:end - 1].all())
    finally:
        unpatch_model(model)
    return correct / len(batches)
