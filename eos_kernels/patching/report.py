"""What a prefill forward of a patched model did: :class:`EOSReport` and its :class:`StageRecord`."""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class StageRecord:
    """One reduction at one layer of one prefill forward.

    Attributes:
        layer: the reducer's decoder layer (it ran at ``seq_in`` tokens).
        regime: the operator regime (prune, merge, pool, reweight, hybrid).
        visual_in, visual_out: visual tokens entering / leaving, per sample.
        seq_in, seq_out: sequence length (padding included) entering / leaving.
        kept_positions: long [B, seq_out], the original positions (indices into
            the input sequence) of the tokens leaving the layer, ascending over
            the valid slots.
        valid_slots: bool [B, seq_out], False at the padding slots of samples
            left shorter than ``seq_out`` (ragged batches: each sample is
            reduced at its own count; its padding slots come first, repeat its
            last position and are masked everywhere), or None when there are none.
    """

    layer: int
    regime: str
    visual_in: tuple[int, ...]
    visual_out: tuple[int, ...]
    seq_in: int
    seq_out: int
    kept_positions: torch.Tensor = dataclasses.field(repr=False, compare=False)
    valid_slots: torch.Tensor | None = dataclasses.field(default=None, repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class EOSReport:
    """What the last prefill forward of a patched model did (``model.eos_report``).

    Attributes:
        theta_name: the Theta's name (or None).
        num_layers: decoder layers of the model.
        batch_size, sequence_length: shape of the prefill input.
        visual_tokens: visual tokens per sample in the input.
        stages: one :class:`StageRecord` per reducer that ran, in layer order.
        note: why nothing was reduced, when nothing was.
        text_tokens: real (not padding) non-visual tokens per sample in the input
            (every real token where the visual ones were not identified, e.g.
            while reduction is suspended: ``visual_tokens`` is 0 there).
        text_sizes: ``(hidden_size, intermediate_size)`` of the model's decoder
            layers (for :meth:`token_report`'s FLOPs estimate), or None.
    """

    theta_name: str | None
    num_layers: int
    batch_size: int
    sequence_length: int
    visual_tokens: tuple[int, ...]
    stages: tuple[StageRecord, ...]
    note: str | None = None
    text_tokens: tuple[int, ...] = ()
    text_sizes: tuple[int, int] | None = None

    @property
    def reduced(self) -> bool:
        return bool(self.stages)

    def _sample(self, sample) -> int:
        """``sample`` as an index into the batch (negative from the end, as for a list)."""
        import operator

        if isinstance(sample, bool):
            raise TypeError("sample must be an int, got bool")
        try:
            index = operator.index(sample)
        except TypeError:
            raise TypeError(f"sample must be an int, got {type(sample).__name__}") from None
        if not -self.batch_size <= index < self.batch_size:
            raise ValueError(f"sample must be in 0..{self.batch_size - 1} (the batch of this forward), got {sample}")
        return index % self.batch_size

    def leaving_per_layer(self, sample: int = 0) -> list[int]:
        """Visual tokens leaving each decoder layer for ``sample``."""
        sample = self._sample(sample)
        current, out = self.visual_tokens[sample], []
        by_layer = {s.layer: s for s in self.stages}
        for layer in range(self.num_layers):
            if layer in by_layer:
                current = by_layer[layer].visual_out[sample]
            out.append(current)
        return out

    def processed_per_layer(self, sample: int = 0) -> list[int]:
        """Visual tokens each decoder layer processes (what enters it) for ``sample``."""
        leaving = self.leaving_per_layer(sample)
        return [self.visual_tokens[sample]] + leaving[:-1]

    def token_report(self, sample: int = 0) -> dict:
        """:meth:`Theta.token_report`'s accounting for one sample of this forward, as it ran.

        The sample's own visual count, the counts its reducers actually kept
        (ragged batches: each sample at its own count), its real text tokens
        and the model's own layer sizes in the FLOPs estimate (same formula).
        Keys: ``schedule`` (``(layer, incoming, kept)`` per reducer that ran),
        ``leaving``, ``processed``, ``final``, ``mean_leaving``,
        ``mean_processed``, ``num_visual_tokens``, ``text_tokens``,
        ``num_layers``, and, when the sizes are known, ``prefill_flops``,
        ``prefill_flops_full``, ``prefill_flops_ratio``, ``hidden_size``,
        ``intermediate_size``.
        """
        from eos_kernels.theta import prefill_flops

        sample = self._sample(sample)
        leaving = self.leaving_per_layer(sample)
        processed = self.processed_per_layer(sample)
        n0 = self.visual_tokens[sample]
        text = self.text_tokens[sample] if self.text_tokens else self.sequence_length - n0
        out = {
            "schedule": [(s.layer, s.visual_in[sample], s.visual_out[sample]) for s in self.stages],
            "leaving": leaving,
            "processed": processed,
            "final": leaving[-1],
            "mean_leaving": sum(leaving) / self.num_layers,
            "mean_processed": sum(processed) / self.num_layers,
            "num_visual_tokens": n0,
            "text_tokens": text,
            "num_layers": self.num_layers,
        }
        if self.text_sizes is not None:
            d, ffn = self.text_sizes
            reduced, full = prefill_flops(processed, text, d, ffn)
            out.update(prefill_flops=reduced, prefill_flops_full=full,
                       prefill_flops_ratio=reduced / full if full else 1.0,
                       hidden_size=d, intermediate_size=ffn)
        return out

    def to_dict(self) -> dict:
        return {
            "theta_name": self.theta_name,
            "num_layers": self.num_layers,
            "batch_size": self.batch_size,
            "sequence_length": self.sequence_length,
            "visual_tokens": list(self.visual_tokens),
            "text_tokens": list(self.text_tokens),
            "note": self.note,
            "stages": [
                {"layer": s.layer, "regime": s.regime, "visual_in": list(s.visual_in),
                 "visual_out": list(s.visual_out), "seq_in": s.seq_in, "seq_out": s.seq_out}
                for s in self.stages
            ],
        }

    def __str__(self) -> str:
        name = f" {self.theta_name!r}" if self.theta_name else ""
        head = (f"EOS report{name}: batch {self.batch_size}, {self.sequence_length} tokens per sample, "
                f"visual tokens per sample {list(self.visual_tokens)}, {self.num_layers} layers")
        if not self.stages:
            return head + "\n  no reduction" + (f" ({self.note})" if self.note else "")
        header = ("layer", "regime", "sample", "visual in", "visual out", "seq in", "seq out")
        rows = [header]
        for s in self.stages:
            for b in range(self.batch_size):
                rows.append((str(s.layer), s.regime, str(b), str(s.visual_in[b]), str(s.visual_out[b]),
                             str(s.seq_in), str(s.seq_out)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [head]
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(w) if i == 1 else c.rjust(w)
                                          for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        means = [sum(self.leaving_per_layer(b)) / self.num_layers for b in range(self.batch_size)]
        lines.append("  mean visual tokens leaving a layer, per sample: "
                     + ", ".join(f"{m:.2f}" for m in means))
        return "\n".join(lines)


