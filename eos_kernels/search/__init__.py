"""The differentiable EOS search (paper §2.4–§2.6, appendix A.1): ``eos-search``.

Usage::

    from eos_kernels.search import SearchConfig, run, evaluate
    result = run(SearchConfig(model="llava-1.5-7b-hf/", data="mix.json", budget=64, output="out/"))
    result.theta                      # the deployable Θ, also out/theta.json
    evaluate(SearchConfig(model="llava-1.5-7b-hf/", data="heldout.json", output="out/"),
             ["out/theta.json", "sparsevlm-v2-64", "none"])

    eos-search --model DIR --data mix.json --budget 64 --output out/ [--config search.yaml] [--resume]
    torchrun --nproc_per_node=8 -m eos_kernels.search --model DIR --data mix.json --budget 64 --output out/
    eos-search --eval out/theta.json sparsevlm-v2-64 none --model DIR --data heldout.json --output out/

Only the :class:`~eos_kernels.search_space.SearchSpace` parameters train; the
model is frozen (``requires_grad=False`` everywhere, eval mode; flags and mode
are restored afterwards when a loaded model is passed to :func:`run`). Each
step: AdamW on Θ, gradient norm clipped, cosine schedule with linear warm-up,
bf16 autocast on CUDA.

The search forward (decisions the paper leaves open)
----------------------------------------------------
``search_forward`` picks between two forwards. **"relaxed"** (the default,
decision 7, ours) lets the gradient reach every decision of Θ; **"hard"** is
the paper's forward as we read it (decisions 1-2), kept for comparison and for
its local moves (decision 6). Decisions 3-5 hold for both. On the relaxed
forward, ``gate_estimator`` picks how the gates learn: **"score"** (the
default, decision 8: sampled structures that meet the budget by construction,
a score-function gradient for the gates) or **"relaxed"** (decision 7's soft,
then binary-concrete gates, the budget as a penalty).

1. **Which layers reduce, and how much (hard forward).** At every forward the search space is
   exported with the deployment rule (:meth:`SearchSpace.export`): layers with
   ``g_l > gate_threshold`` (0.5), at most ``max_reducers`` (C) of them, the
   strongest gates first; K_l from equation 11 (hard top-K, ``floor((1 − g_l
   c_l) N_l)``, at least K_min) along the chain of those layers. The search
   forward and the exported Θ therefore agree exactly (the paper says "≥ 0.5";
   export's strict ">" is used so that both are one rule). The operator gets
   the layer's differentiable 0-d tensors γ, τ, θ, ρ, ν
   (:meth:`SearchSpace.operator_params`) through the package's own
   ``patch_llava`` machinery (``patching.patch_model(..., plan=SearchPlan)``,
   the same ``_reduce`` as deployment) and :func:`~eos_kernels.eos_reduce`
   (``--impl``: fused Triton autograd kernels on CUDA with "auto", the PyTorch
   reference on the CPU), so the task loss reaches Ω through the operator.
2. **Straight-through keep probability (equation 12, hard forward).** The reduced anchors
   are multiplied by ``p_i / sg(p_i)`` (forward value exactly 1), with
   ``p_i = SearchSpace.keep_probability(z, l, K_l)`` gathered at the anchors.
   Importance scores are attention probabilities (~1/N), so equation 12 is
   applied to log-scores ``z = log(max(q, 1e-30))``: ``α (z_i − z_(K)) = α
   log(q_i / q_(K))`` means the same for any N (α = 10: a token with 10% more
   importance than the K-th gets σ(0.95) ≈ 0.72). The importance kernel is
   forward-only (scores carry no gradient), so in the backward the factor's
   gradient is that of ``(1 − g c) / (1 − sg(g c))``: the task loss reaches
   g_l and c_l of the active layers through it; α shapes only p's value
   (logged as ``soft_kept``, Σ_i p_i, the relaxed count per active reducer).
3. **Loss (equations 13–14).** ``λ_ce · CE + λ_a · align + λ_b [N̄_L/B − 1]₊²
   + λ_c [Σ g − C]₊²``. CE: summed over the answer tokens (labels −100
   elsewhere), divided by the number of answer tokens of the *global* batch.
   align: for each alignment layer l (0-indexed; the output of decoder layer
   l, after its own reduction if it is a reducer), the squared error between
   the reduced forward's and a no-grad unreduced forward's hidden states at the
   text (non-visual, non-padded) positions, summed, divided by (global text
   tokens × hidden size), averaged over the layers -- a mean squared error.
   Reduced forwards are shorter after a reducer: text positions are mapped
   through ``StageRecord.kept_positions`` (text tokens are never removed).
   The unreduced forward is the same patched model inside
   ``patching.suspended(model)`` (hooks stay installed; the model is never
   left unpatched by accident). N̄_L and the penalties come from the
   SearchSpace.
4. **Prompts.** ``apply_chat_template`` when the processor (or tokenizer) has
   a chat template, else LLaVA-1.5's ``"USER: <image>\\n{question}
   ASSISTANT:"`` with the answer appended as ``" {answer}"`` + eos; multi-turn
   records continue ``"USER: {q} ASSISTANT: {a}</s>"``. Details, and how the
   answer tokens are found, in :mod:`eos_kernels.search.data`.
5. **Rating rows.** In ``generate`` only the prompt rates the visual tokens;
   a teacher-forced forward would let the answer tokens rate them too (a leak
   of the answer into the selection). The search limits the rating rows to
   each sample's prompt (the tokens before its first answer token) with
   ``patching.prompt_lengths``, so the search sees the deployed selection.

6. **Local moves (not in the paper; off by default; hard forward only).** Two parts of Θ get no useful gradient from the search forward,
   as the built-in demo shows (``eos-search --demo --search-forward hard``):
   (a) a layer that does not reduce is absent from the forward, so the task
   loss never reaches its gate -- gates outside the warm-start slots stay at
   ``off_gate`` (0.01) for good, the penalties being zero at a feasible warm
   start; (b) g and c of an active reducer are reached only through the
   straight-through factor of decision 2, whose gradient is that of scaling
   the kept anchors (the importance kernel carries no gradient), and the next
   layer's RMSNorm undoes most of a scale: it says little about keeping more
   or fewer tokens. So every ``local_moves_every`` steps the driver tries, on
   a fixed probe set (the first ``local_moves_samples`` search examples, no
   grad, the search forward itself): moving each active reducer to a free
   neighbouring layer (all seven parameters of the two layers and their AdamW
   moments swap), and shifting retained tokens between each ordered pair of
   active reducers (one reducer's kept fraction ``1 − g c`` times
   ``local_moves_factor``, the other's divided by it, through c). A candidate
   may not deploy more final visual tokens than the current Θ (or the budget,
   whichever is larger); the one with the lowest probe CE is kept if it beats
   the current Θ by more than ``local_moves_margin``. The log records every
   candidate's probe CE (``local_moves``), and ``trajectories.png`` marks the
   accepted moves. The continuous parameters (Ω, and g, c between moves)
   still train by gradient as in the paper; the moves are a discrete search
   over what the gradient cannot see, so the exported Θ can put a reducer
   on a layer the warm start did not. With ``local_moves_every = 0`` the
   search is the paper's.

7. **The relaxed forward (ours; the default forward).** Decisions 1-2 leave the
   gradient blind where it matters (decision 6 says why): a layer that does not
   reduce is absent from the forward, and the straight-through factor reaches
   g, c only as a rescaling of the kept anchors. The relaxed forward
   (:mod:`eos_kernels.search.relaxed`, equations there) removes nothing: every
   visual token keeps a *presence* P in (0, 1], every layer but the last keeps
   the share ``1 − c_l`` of the presence entering it by a soft top-K on its
   importance (temperature T), and its gate mixes that in (``P ← P (1 − ĝ (1 −
   κ))``); later layers attend to each visual key with the bias ``log P`` (a
   removed token influences the text only as a key/value, so P → 0 is a removal,
   P = 1 is no change), and the operator runs softly (every token an anchor of
   weight P, a candidate of the mass it loses). So the loss is a smooth function
   of every layer's g and c and of Ω (checked against finite differences,
   ``tests/test_search_relaxed.py``); at T → 0 with hard gates it *is* the
   deployed forward (tested). The schedule:

   - steps ``[0, sharpen_from)`` of the relaxed part: deterministic gates ĝ = g;
     the budget and FLOPs see the *effective* count (Σ P)² / Σ P², so dimming
     every token a little (c → 1 at a partial gate) earns no budget;
   - then binary-concrete gates, one sample per layer and sample, on with
     probability g, their temperature λ falling geometrically to
     ``sharpness_end``: a deterministic gate can sit at g = 1/2 where a
     part-strength layer costs little, and would deploy as a coin flip; a
     sampled one shows the forward the layer wholly on or off; the penalties
     take the expectation (equation 13's N̄, ``1 − g c`` per layer);
   - T falls geometrically from ``temperature_start`` to ``temperature_end``
     over the relaxed steps;
   - the last ``hard_finish`` share of the steps (25 %) runs the hard forward
     (decisions 1-2) on the structure reached, with g and c frozen (their
     gradients dropped, not zeroed: AdamW would still move them): Ω finishes
     on the exact deployed forward.

   Departures from the paper, all ours: every layer's keep decision is in the
   forward (the paper's holds the active layers only); equation 12's
   straight-through factor is replaced by the soft top-K; the gate enters the
   forward as a mixture, then as a sample; the last layer never reduces (a
   reducer there removes nothing that runs: the search never activates it);
   T_g defaults to 4 (the gates must be able to move in a few hundred steps);
   **and the cost**: the paper's objective bounds the final count and the
   number of active layers, and a gradient that reaches every layer finds that
   a reducer just before the last meets any final budget at no cost in
   accuracy -- and saves nothing (the built-in demo's search walks there). So
   the relaxed search also bounds the estimated prefill FLOPs ratio
   (``Theta.token_report``'s formula on the expected chain) by ``max_flops``,
   a one-sided penalty of weight ``lambda_flops`` (100: a wall); by default
   ("auto") at the warm start's ratio plus half of what the warm start saves.
   The exported Θ keeps, at each selected layer, the share its relaxed forward
   kept (``1 − ĝ c`` with the final λ; ``SearchSpace.export(sharpness=...)``).
   Cost: the relaxed forward runs at full length with a float attention mask and
   one [N, N] similarity per layer and sample (measured per step against the
   hard one in ``bench/test_bench_search_step.py``).
   Its limit (measured on the built-in demo): a warm-start reducer at a
   layer where reducing is harmful is not moved away while its gate holds
   most of the budget. Keeping a few more tokens there changes the loss too
   little for the gradient to see that no reduction there is far better, and
   the budget penalty's gradient holds that gate open: of all gates, the one
   doing most of the reduction has the largest lever on the final count (a
   layer-0 warm start: g0 0.95 → 0.79-0.88 with ``gate_estimator="relaxed"``;
   detaching the gates from the budget penalty, or equalising their levers,
   did not move it either). Hence decision 8.

8. **Sampled structures (ours; the default gate estimator).**
   (:mod:`eos_kernels.search.sampled`, equations there.) Each sample of a
   batch runs one structure: the layers whose gate it draws on (``P(on) =
   g``; the last layer never; a sample that draws none gets the layer of the
   largest g), hard gates (ĝ = 0/1) in the relaxed forward of decision 7,
   and at its active layers the deployed hard top-K (the soft top-K's
   gradient passed straight through: over importances a layer cannot yet
   rank, the soft top-K dims every token instead of removing some, and the
   loss would not show what the removal costs).
   The budget holds by construction: the active layers of a sample keep
   ``(1 − c_l)^α`` each, α chosen so that their product is ``B / N₀`` -- c
   becomes a layer's claim on the budget's reduction, not its own discarded
   share, and its gradient (pathwise, through the soft top-K) says which
   layer should take more of it. A gate moves by the score function: ``Σ_i
   (ℓ_i − b_i) ∇ log p(z_i)`` with ``ℓ_i`` sample i's answer CE (its share of
   ``λ_ce · CE``) and the leave-one-out baseline ``b_i`` -- how much better
   the samples that ran without the layer did than those that ran with it, the
   question decision 7's gradient cannot ask (keeping a few more tokens at a
   harmful layer changes nothing; running without it changes a lot). The
   batch sums behind it are all-reduced with the gradients, so torchrun equals
   one process. The FLOPs cap and the layer-count penalty act on the mean-field
   chain (z replaced by g); the budget penalty is zero by construction.
   Layers outside the warm start start at ``off_gate`` = min(0.2, C / (L −
   1)) instead of 0.01, so that each is drawn in enough samples to be judged.
   What deploys (logged, exported, frozen for the hard finish) is the
   export's rule: g > 1/2, the C strongest, each keeping ``(1 − c̃_l) =
   (1 − c_l)^α*`` with α* over those layers (the c̃ are written into the
   search space when the hard finish begins). Costs: a sample carries a
   structure, so a batch explores several at once; the estimate's variance
   is higher than a pathwise gradient's, which larger batches or more steps
   pay for; alignment (λ_a) trains the c's and Ω but not the gates.

Defaults (:class:`SearchConfig`)
--------------------------------
Table 5: AdamW lr 1e-3, weight decay 0, betas (0.9, 0.999), clip 1.0, cosine
with 5% linear warm-up (``round(0.05·steps)`` steps, lr ramps ``(s+1)/W``),
4,000 steps, global batch 4, λ_a 0.1, seed 42, bf16 autocast on CUDA (model
weights bf16 on CUDA, fp32 on the CPU; ``--eval`` loads fp16 on CUDA, table 5's
eval precision), γ0 = τ0 = 0.5, θ0 = ρ0 = ν0 = 0 (ρ0, ν0 start 0.001 inside
(0, 1), see :mod:`eos_kernels.search_space`), C = 3 slots.

Not in the paper, chosen here:

- **λ_b = 10, λ_c = 10.** The constraints are meant to hold at the end, not be
  traded freely against accuracy: at 10 a 10% budget overshoot costs 0.1 (and
  a gradient of 2 per unit of N̄/B), comparable to the CE change a reduction
  causes (~0.1–1 nats), and one surplus active layer costs 10. Both are
  exposed (``--lambda-budget``, ``--lambda-layers``).
- **Depth scaling.** Reducer slots: layer l of 32 becomes
  ``floor(l·L/32 + 1/2)`` (2, 6, 15 at 32; 0, 1, 3 at 6; 3, 8, 19 at 40),
  collisions moved to the next free layer, the first C of them when C < 3.
  Alignment layers: every ``s = max(1, round(L/8))``-th layer from s to L − 1
  (4, 8, …, 28 at 32; 1..5 at 6; 5, 10, …, 35 at 40).
- **Warm start (§2.6).** The slots start at g0 = 0.95 (the SearchSpace
  default; other layers 0.01) with a discard c0 such that the slots' chain
  keeps the budget: ``N0 (1 − g0 c0)^slots = B`` (clamped to [0.01, 0.99];
  ``--init-discard`` overrides). §2.6 also speaks of γ "close to zero"; table
  5's γ0 = 0.5 is the default (``--gamma0`` sets it).
- λ_ce = 1 (the paper's; 0 is allowed, for ablations and tests).

Note: N̄_L multiplies ``(1 − g_l c_l)`` over *all* layers, so the inactive
layers' small gates (0.01 · 0.5 each) make N̄_L a few per cent lower than the
deployed final count on a 32-layer model (both are logged:
``expected_tokens``, ``deployed_tokens``).

Outputs and control
-------------------
``--output`` holds ``theta.json`` (the exported Θ at the model's visual
tokens), ``search_state.pt`` (search parameters, AdamW and scheduler state,
step, data position, RNG states, the config), ``log.jsonl`` (one JSON object
per step: ce, align, budget, layers -- unweighted -- and the weighted total,
expected_tokens N̄_L, deployed_tokens, active_layers, kept schedule,
soft_kept, every layer's g, c, gamma, tau, theta, rho, nu as used by that
step's forward, lr, grad_norm, answer/text token counts, the sample indices,
and the wall-clock fields ``step_time`` and ``time``), and ``trajectories.png``,
``profile.png``, ``loss.png``. A checkpoint is written at step 0, every
``--checkpoint-every`` steps and at the end (atomically). ``--resume``
continues bit for bit on the CPU (the log is truncated to the checkpoint's
step, options that change the maths must match). Ctrl-C saves a checkpoint of
the last completed step and exits (the optimizer update itself is shielded
from the signal); a non-finite loss or gradient raises
:class:`NonFiniteLossError` without touching the last good checkpoint. No file
already in ``--output`` is replaced without ``--overwrite`` (``--resume`` for
the search's own checkpoint): a search refuses a folder holding any file it
would write, ``--eval`` an existing ``eval.json``
(:mod:`eos_kernels.search.output`). A budget below ``k_min`` cannot be reached
(equation 11 keeps at least K_min tokens at every reducer): :func:`run` warns.

Data parallelism: under ``torchrun`` (gloo on CPU, nccl on CUDA) the global
batch is split evenly across ranks (``batch_size`` must be a multiple of the
world size), the CE and alignment are normalised by global counts, the search
parameters' gradients are summed with ``all_reduce`` (so N ranks compute the
same gradient as one process with the whole batch), the penalties are added
once after the reduction, and rank 0 writes every output.
"""
from eos_kernels.search.config import SearchConfig
from eos_kernels.search.driver import NonFiniteLossError, SearchResult, run
from eos_kernels.search.evaluate import evaluate

__all__ = ["SearchConfig", "SearchResult", "NonFiniteLossError", "run", "evaluate"]
