"""The built-in demo: a synthetic visual question-answering task and a small trained LLaVA for it.

- :mod:`eos_kernels.demo.task`: scenes of 10-18 flat shapes on an 8x8 grid of
  8 px cells (64 px images), questions whose answers live in specific cells or
  need many of them: the colour / shape at a named cell, the colour of the only
  object of a kind, how many objects have a colour; LLaVA-format splits,
  deterministic, train / search / eval disjoint by a content hash.
- :mod:`eos_kernels.demo.build`: the demo model (a stock
  ``LlavaForConditionalGeneration``: 2-layer CLIP at 64 px / 8 px patches ->
  64 visual tokens, one per grid cell, so each token sees one whole object;
  an 8-layer Llama decoder with GQA, d = 128, 1.3 M parameters), its
  word-level tokenizer and processor, and
  :func:`~eos_kernels.demo.build.load_demo_model` for the checkpoint shipped in
  ``eos_kernels/demo/checkpoint/`` (loaded offline with ``from_pretrained``;
  ``training_report.json`` there holds its measured held-out accuracies, full
  and pruned, and every training run's command, time and seed).
- :mod:`eos_kernels.demo.run`: ``eos-search --demo``, the matched-cost
  comparison: a search at each budget of a grid (4, 8, 16, 32 of 64 visual
  tokens), every baseline family tuned over its placements on the search split
  (:mod:`~eos_kernels.demo.baselines`, :mod:`~eos_kernels.search.scoring`),
  the held-out split read once per configuration, and per budget which
  baselines the searched Θ dominates and which dominate it
  (:mod:`~eos_kernels.demo.compare`, :mod:`~eos_kernels.demo.frontier`);
  tables, one JSON per reported Θ and the accuracy-FLOPs plot
  (:mod:`~eos_kernels.demo.report`); the jobs run in two single-threaded
  worker processes (:mod:`~eos_kernels.demo.workers`).
- ``scripts/train_demo.py`` trains the model (``train``, resumable) and writes
  the checkpoint (``export``).

How the model was made learnable (measured, see ``training_report.json`` and
``scripts/train_demo.py``): with one object per visual token the answer is one
token in 64, and from the answer loss alone the model stays at the answer
prior for hundreds of steps even on one-object scenes (a plain average of the
tokens hides the object); a scene that fills the image is learned in 50 steps.
Training therefore uses a curriculum (1-4 objects growing to the task's 10-18,
a dominant colour fading out) and three training-only probes that are not part
of the exported model: a per-visual-token read-out of each cell's colour,
shape, row and column after decoder layer 1, supervision of one attention head
of layer 2 towards the cells the question is about, and a read-out of the
attended object's colour and shape at the answer position.
"""
