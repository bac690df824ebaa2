"""The built-in demo: a synthetic visual question-answering task and a small LLaVA for it.

- :mod:`eos_kernels.demo.task`: scenes of shapes on a 4x4 grid, questions whose
  answers live in specific cells (colour / shape at a named cell, same shape at
  two cells, how many shapes of a colour), LLaVA-format splits, deterministic.
- :mod:`eos_kernels.demo.build`: the demo model (a stock
  ``LlavaForConditionalGeneration``: 2-layer CLIP at 64 px / 8 px patches ->
  64 visual tokens, an 8-layer Llama decoder with GQA, d = 128, 1.3 M
  parameters), its word-level tokenizer and processor, and
  :func:`~eos_kernels.demo.build.load_demo_model` for the shipped checkpoint.
- :mod:`eos_kernels.demo.run`: ``eos-search --demo`` (search at 8 of 64 visual
  tokens, then the full model, FastV-, SparseVLM-, ToMe- and Pool-style
  baselines and the searched Θ on the held-out split).
- ``scripts/train_demo.py`` trains the model and writes the checkpoint.

Status: **no trained checkpoint is shipped yet**, so ``eos-search --demo``
stops with a message saying so. Training on 2 CPU cores (2,500 steps of 32
images x 4 questions, AdamW 3e-3, about 14 minutes) stayed on a plateau at the
answer prior (teacher-forced held-out accuracy ~0.3, loss ~0.71 = the entropy
of the answers given the question type): the model learns to read a cell that
is always the same in ~150 steps, but not yet to look a *named* cell up (600
steps with one question type; also with the question before the image, with
one token per cell name, or with larger vision position embeddings at init).
Next steps to try: many more steps (the per-cell lookup sees 1/16 of the data
of a fixed cell), a curriculum from fixed cells to named ones, or a wider
vision tower; then ship the checkpoint and its measured accuracies.
"""
