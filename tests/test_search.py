"""eos_kernels.search (``eos-search``) on a tiny random LLaVA saved to disk (CPU, fp32).

The model and processor come from ``tests/_tiny_models.py`` (6 layers, 16
visual tokens per image, word-level tokenizer) and are written with
``save_pretrained`` so that ``--model`` is a real checkpoint directory; the data
set is a small LLaVA-format JSON with real PNG files (some records with two
turns). With 16 visual tokens and 6 layers the default reducer slots are layers
0, 1, 3 and the alignment layers 1..5.
"""
import json
import math
import os
import re
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(__file__))

from eos_kernels.patching import is_patched, prompt_lengths  # noqa: E402
from eos_kernels.search import NonFiniteLossError, SearchConfig, evaluate, run  # noqa: E402
from eos_kernels.search import objective  # noqa: E402
from eos_kernels.search.config import default_align_layers, scale_init_layers, warm_start_discard  # noqa: E402
from eos_kernels.search.driver import TIMING_FIELDS  # noqa: E402
from eos_kernels.search.cli import parse_config  # noqa: E402
from eos_kernels.search_space import SearchSpace  # noqa: E402
from eos_kernels.theta import Reducer, Theta  # noqa: E402

from _tiny_models import (  # noqa: E402
    BOS_TOKEN_ID, EOS_TOKEN_ID, IMAGE_TOKEN_ID, save_tiny_llava, tiny_processor, write_llava_dataset,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_VIS = 16
PARAMS = ("w_g", "w_c", "w_gamma", "w_tau", "w_theta", "w_rho", "w_nu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")



#: the search forwards under test: the paper's hard one, the relaxed one with sampled structures (decision 8, the
#: default) and with relaxed gates (decision 7)
FORWARDS = {"hard": {"search_forward": "hard"}, "sampled": {"search_forward": "relaxed"},
            "relaxed": {"search_forward": "relaxed", "gate_estimator": "relaxed"}}

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    model_dir = save_tiny_llava(root / "model")
    data = write_llava_dataset(str(root / "data"), n=8, seed=0)
    return SimpleNamespace(root=root, model=model_dir, data=data)


@pytest.fixture(scope="module")
def loaded(env):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(env.model).eval()
    return model, AutoProcessor.from_pretrained(env.model)


def config(env, out, **kw):
    # no plots unless a test asks: they are most of a 3-step CPU search's time (checked where asked)
    base = dict(model=env.model, data=env.data, budget=6, steps=3, batch_size=4, output=str(out), progress=False,
                plots=False)
    base.update(kw)
    return SearchConfig(**base)


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_state(out):
    return torch.load(os.path.join(out, "search_state.pt"), map_location="cpu", weights_only=False)


def initial_space(state):
    return SearchSpace(**state["space_kwargs"]).state_dict()


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


# --------------------------------------------------------------------------- defaults
def test_depth_scaled_defaults():
    assert scale_init_layers(32) == [2, 6, 15]
    assert scale_init_layers(6) == [0, 1, 3]
    assert scale_init_layers(40) == [3, 8, 19]
    assert scale_init_layers(2) == [0, 1]
    assert scale_init_layers(32, slots=2) == [2, 6]
    assert default_align_layers(32) == [4, 8, 12, 16, 20, 24, 28]
    assert default_align_layers(6) == [1, 2, 3, 4, 5]
    assert default_align_layers(40) == [5, 10, 15, 20, 25, 30, 35]
    c = warm_start_discard(64, 576, 3, 0.95)
    assert math.isclose(576 * (1 - 0.95 * c) ** 3, 64, rel_tol=1e-12)
    d = SearchConfig()
    assert (d.lr, d.weight_decay, d.grad_clip, d.warmup_ratio, d.steps, d.batch_size, d.lambda_align, d.seed,
            d.gamma0, d.tau0, d.theta0, d.rho0, d.nu0, d.max_reducers) == \
        (1e-3, 0.0, 1.0, 0.05, 4000, 4, 0.1, 42, 0.5, 0.5, 0.0, 0.0, 0.0, 3)


# --------------------------------------------------------------------------- an unreachable --budget
def _budget_warnings(record):
    return [str(w.message) for w in record if "--budget" in str(w.message)]


@pytest.mark.parametrize("budget, k_min", [(0.5, 1), (3, 4), (3.9, 4)])
def test_an_unreachable_budget_warns_before_the_model_loads(env, tmp_path, monkeypatch, budget, k_min):
    """Equation 11 keeps at least K_min tokens at every reducer: a budget below it cannot be deployed."""
    def stop(*a, **k):
        raise ValueError("stopped at the model load")

    monkeypatch.setattr("eos_kernels.search.driver.load_model", stop)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="stopped at the model load"):
            run(config(env, tmp_path / "o", budget=budget, k_min=k_min))
    said = _budget_warnings(record)
    assert len(said) == 1, said
    assert f"--budget {budget:g} cannot be reached" in said[0]
    assert f"lowest final visual count this search can deploy is {k_min}" in said[0]
    assert "--k-min" in said[0] and "K_min" in said[0]


@pytest.mark.parametrize("budget, k_min", [(1, 1), (4, 4), (6, 1)])
def test_a_reachable_budget_does_not_warn(env, loaded, tmp_path, budget, k_min):
    model, processor = loaded
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = run(config(env, tmp_path / "o", budget=budget, k_min=k_min, steps=1), model=model,
                     processor=processor)
    assert _budget_warnings(record) == []
    assert result.theta.token_report(N_VIS, 6)["final"] >= k_min


def test_the_command_line_warns_on_an_unreachable_budget_and_still_searches(env, tmp_path, capsys):
    from eos_kernels.search.cli import main

    out = tmp_path / "o"
    with pytest.warns(UserWarning, match=r"--budget 0\.5 cannot be reached.*is 1"):
        assert main(["--model", env.model, "--data", env.data, "--budget", "0.5", "--steps", "1",
                     "--output", str(out), "--no-progress", "--no-plots"]) == 0
    assert Theta.from_json(str(out / "theta.json")).token_report(N_VIS, 6)["final"] >= 1


def test_k_min_above_the_visual_tokens_is_refused_before_the_model_loads(env, tmp_path, monkeypatch):
    monkeypatch.setattr("eos_kernels.search.driver.load_model",
                        lambda *a, **k: pytest.fail("the model was loaded before k_min was checked"))
    with pytest.raises(ValueError, match="k_min 17 exceeds the 16 visual tokens"):
        run(config(env, tmp_path / "o", k_min=17))
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- prompts and labels
TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() + ': ' }}{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}"
            "{% if m['role'] == 'assistant' %}{{ '</s>' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


@pytest.mark.parametrize("template", [None, TEMPLATE], ids=["llava15", "chat-template"])
def test_prompts_and_answer_labels(env, template):
    from eos_kernels.search.data import load_dataset

    processor = tiny_processor(chat_template=template)
    tok = processor.tokenizer
    ds = load_dataset(env.data, processor, num_visual_tokens=N_VIS, image_token_id=IMAGE_TOKEN_ID)
    records = json.load(open(env.data))
    for ex, rec in zip(ds.examples, records):
        words = tok.convert_ids_to_tokens(ex.input_ids)
        assert ex.input_ids.count(IMAGE_TOKEN_ID) == N_VIS
        assert words[0] == "<s>" and words[1] == "USER:" and words[2:2 + N_VIS] == ["<image>"] * N_VIS
        answers = [t["value"] for t in rec["conversations"][1::2]]
        labelled = [tok.convert_ids_to_tokens([x])[0] for x in ex.labels if x != -100]
        assert labelled == [w for a in answers for w in a.split() + ["</s>"]]
        # the answer tokens follow "ASSISTANT:", and the prompt ends right before the first one
        assert words[ex.prompt_length - 1] == "ASSISTANT:"
        assert ex.labels[:ex.prompt_length] == [-100] * ex.prompt_length
    batch = ds.collate([0, 2])
    assert batch.input_ids.shape[0] == 2 and batch.pixel_values.shape == (2, 3, 56, 56)
    assert (batch.labels[batch.attention_mask == 0] == -100).all()


# --------------------------------------------------------------------------- CLI entry point
def test_help_through_the_console_entry_point(capsys):
    setup = open(os.path.join(REPO, "setup.py")).read()
    m = re.search(r"['\"]eos-search\s*=\s*([\w.]+):(\w+)['\"]", setup)
    assert m, "setup.py declares the eos-search console script"
    import importlib

    main = getattr(importlib.import_module(m.group(1)), m.group(2))
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model", "--data", "--image-folder", "--budget", "--max-reducers", "--steps", "--batch-size",
                   "--lr", "--lambda-align", "--lambda-budget", "--lambda-layers", "--align-layers", "--seed",
                   "--impl", "--output", "--resume", "--config", "--checkpoint-every", "--eval"):
        assert option in out, option


# --------------------------------------------------------------------------- a run and its outputs
def test_run_outputs_and_frozen_model(env, loaded, tmp_path):
    model, processor = loaded
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    trainable = []

    original = objective.data_terms

    def spy(model_, batch, capture, **kw):
        trainable.append([n for n, p in model_.named_parameters() if p.requires_grad])
        return original(model_, batch, capture, **kw)

    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(objective, "data_terms", spy)
        # the paper's forward: the parameter-by-parameter reach checked below is its straight-through one
        result = run(config(env, out, steps=3, plots=True, search_forward="hard"), model=model,
                     processor=processor)
    # frozen backbone during the run, untouched afterwards, unpatched, flags restored
    assert trainable and all(t == [] for t in trainable)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not is_patched(model)
    # only the search parameters are in the checkpoint and the optimizer
    state = load_state(out)
    assert set(state["space"]) == set(PARAMS) and state["step"] == 3
    assert len(state["optimizer"]["param_groups"][0]["params"]) == len(PARAMS)
    # the task loss reaches every parameter of the active layers (γ, τ, θ, ρ, ν through the operator,
    # g and c through the straight-through keep probability); the penalties are inactive here
    # (N̄_L <= B, Σg <= C), so nothing of the inactive layers moves
    init = initial_space(state)
    for k in PARAMS:
        moved = state["space"][k] != init[k]
        assert moved.tolist() == [True, True, False, True, False, False], k
    # theta.json loads and is the search space's export
    theta = Theta.from_json(str(out / "theta.json"))
    assert theta == result.theta and len(theta) >= 1
    theta.validate(6, N_VIS)
    # one log line per step with the loss terms, tokens, active layers and every layer's parameters
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3]
    for r in log:
        for key in ("ce", "align", "budget", "layers", "total", "expected_tokens", "active_layers", "lr",
                    "step_time", "deployed_tokens"):
            assert key in r, key
        for key in ("g", "c", "gamma", "tau"):
            assert len(r[key]) == 6
        assert r["active_layers"] == [0, 1, 3]
        assert math.isfinite(r["total"]) and r["ce"] > 0 and r["align"] > 0
    for name in ("trajectories.png", "profile.png", "loss.png"):
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert sorted(result.plots) == sorted(str(out / n) for n in ("trajectories.png", "profile.png", "loss.png"))


def test_no_plots_writes_none(env, loaded, tmp_path):
    model, processor = loaded
    result = run(config(env, tmp_path, steps=1, plots=False), model=model, processor=processor)
    assert result.plots == [] and not list(tmp_path.glob("*.png"))
    assert (tmp_path / "theta.json").is_file()
    assert parse_config(["--no-plots", "--budget", "4"]).plots is False
    assert parse_config(["--budget", "4"]).plots is True
    with pytest.raises(ValueError, match="plots"):
        SearchConfig(plots="no").validate()


# --------------------------------------------------------------------------- loss decomposition
def _logged_theta(rec):
    """The Θ a logged step's forward used (its layers, counts and operator parameters)."""
    return Theta([Reducer(layer, kept, gamma=rec["gamma"][layer], tau=rec["tau"][layer],
                          theta=rec["theta"][layer], rho=rec["rho"][layer], nu=rec["nu"][layer])
                  for layer, _, kept in rec["kept"]])


def _reference_batch(env, processor, samples):
    """The logged step's batch, built here from the vocabulary (no search code): LLaVA-1.5 format."""
    from PIL import Image

    tok = processor.tokenizer
    records = json.load(open(env.data))
    seqs, labs, prompts, images = [], [], [], []
    for i in samples:
        r = records[i]
        ids, labels = [BOS_TOKEN_ID], [-100]
        for t in range(0, len(r["conversations"]), 2):
            q = []
            for w in ["USER:"] + r["conversations"][t]["value"].split() + ["ASSISTANT:"]:
                q += [IMAGE_TOKEN_ID] * N_VIS if w == "<image>" else tok.convert_tokens_to_ids([w])
            a = tok.convert_tokens_to_ids(r["conversations"][t + 1]["value"].split()) + [EOS_TOKEN_ID]
            if t == 0:
                prompts.append(len(ids) + len(q))
            ids += q + a
            labels += [-100] * len(q) + a
        seqs.append(ids)
        labs.append(labels)
        with Image.open(os.path.join(os.path.dirname(env.data), r["image"])) as im:
            images.append(im.convert("RGB"))
    L = max(len(s) for s in seqs)
    return SimpleNamespace(
        input_ids=torch.tensor([s + [0] * (L - len(s)) for s in seqs]),
        labels=torch.tensor([s + [-100] * (L - len(s)) for s in labs]),
        mask=torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs]),
        pixels=processor.image_processor(images, return_tensors="pt")["pixel_values"],
        prompts=prompts)


def test_loss_is_the_answer_cross_entropy_without_align_and_penalties(env, loaded, tmp_path):
    """λ_a = λ_b = λ_c = 0: the logged loss is the model's own answer-token CE under the patched forward."""
    from eos_kernels import patch_llava, unpatch_llava

    model, processor = loaded
    out = tmp_path / "out"
    run(config(env, out, steps=1, lambda_align=0.0, lambda_budget=0.0, lambda_layers=0.0, search_forward="hard"),
        model=model,
        processor=processor)
    rec = read_log(out)[0]
    assert rec["total"] == rec["ce"]
    theta = _logged_theta(rec)
    assert theta.layers == (0, 1, 3)
    b = _reference_batch(env, processor, rec["samples"])
    patch_llava(model, theta)
    try:
        with torch.no_grad(), prompt_lengths(model, b.prompts):
            hf_loss = model(input_ids=b.input_ids, attention_mask=b.mask, pixel_values=b.pixels,
                            labels=b.labels).loss
        assert [s.visual_out[0] for s in model.eos_report.stages] == [k for _, _, k in rec["kept"]]
    finally:
        unpatch_llava(model)
    assert rec["answer_tokens"] == int((b.labels[:, 1:] != -100).sum())
    assert abs(rec["ce"] - float(hf_loss)) < 1e-5 * max(1.0, float(hf_loss))


def test_alignment_term(env, loaded, tmp_path):
    """λ_ce = 0, λ_a = 1, no penalties: the loss is the mean over the alignment layers of the MSE of the
    text positions' hidden states, reduced (``output_hidden_states``, each layer at its own length) vs
    unreduced."""
    from eos_kernels import patch_llava, unpatch_llava

    model, processor = loaded
    out = tmp_path / "out"
    layers = [1, 2, 4]  # a reducer's own output, a layer between reducers, a layer after the second
    run(config(env, out, steps=1, lambda_ce=0.0, lambda_align=1.0, lambda_budget=0.0, lambda_layers=0.0,
               align_layers=layers, search_forward="hard"), model=model, processor=processor)
    rec = read_log(out)[0]
    assert rec["total"] == rec["align"] > 0
    b = _reference_batch(env, processor, rec["samples"])
    text = b.mask.bool() & (b.input_ids != IMAGE_TOKEN_ID)
    # each decoder layer's output, seen by forward hooks registered after the patch's own (so after the
    # reduction), as the search's LayerCapture sees them; output_hidden_states records them at a
    # release-dependent point (before the reduction on transformers 5.0, after it on 5.24)
    from transformers import LlavaForConditionalGeneration

    fresh = LlavaForConditionalGeneration.from_pretrained(env.model).eval()

    def outputs_of(forward):
        seen, handles = {}, []
        for layer in layers:
            def hook(module, args, output, layer=layer):
                seen[layer] = output[0] if isinstance(output, tuple) else output
            handles.append(fresh.model.language_model.layers[layer].register_forward_hook(hook))
        try:
            forward()
        finally:
            for h in handles:
                h.remove()
        return seen

    def forward():
        fresh(input_ids=b.input_ids, attention_mask=b.mask, pixel_values=b.pixels)

    with torch.no_grad():
        patch_llava(fresh, _logged_theta(rec))
        try:
            with prompt_lengths(fresh, b.prompts):
                red = outputs_of(forward)
            stages = fresh.eos_report.stages
        finally:
            unpatch_llava(fresh)
        full = outputs_of(forward)
    mse = []
    for layer in layers:
        h = red[layer]  # the output of decoder layer `layer`
        positions = torch.arange(h.shape[1]).expand(h.shape[0], -1)
        for s in stages:
            if s.layer <= layer:
                positions = s.kept_positions
        assert positions.shape[1] == h.shape[1]
        mse.append(((h[text.gather(1, positions)] - full[layer][text]) ** 2).mean())
    expected = float(torch.stack(mse).mean())
    assert abs(rec["align"] - expected) < 1e-5 * expected


# --------------------------------------------------------------------------- penalties
def _penalty_run(env, loaded, out, **kw):
    model, processor = loaded
    run(config(env, out, lambda_ce=0.0, lambda_align=0.0, init_layers=[0, 1, 3], search_forward="hard", **kw),
        model=model,
        processor=processor)
    state = load_state(out)
    return initial_space(state), state["space"]


def test_penalties_move_theta_only_when_violated(env, loaded, tmp_path):
    # budget violated (N̄_L ~ 16·0.81³ >> 2): every gate and discard grows, the operator does not move
    init, final = _penalty_run(env, loaded, tmp_path / "a", budget=2, init_discard=0.2, lambda_budget=10.0,
                               lambda_layers=0.0)
    assert (final["w_c"] > init["w_c"]).all() and (final["w_g"] > init["w_g"]).all()
    for k in ("w_gamma", "w_tau", "w_theta", "w_rho", "w_nu"):
        assert torch.equal(final[k], init[k]), k
    # too many active layers (Σg ≈ 2.9 > C = 1): every gate shrinks, nothing else moves
    init, final = _penalty_run(env, loaded, tmp_path / "b", budget=16, max_reducers=1, lambda_budget=10.0,
                               lambda_layers=10.0)
    assert (final["w_g"] < init["w_g"]).all()
    for k in PARAMS[1:]:
        assert torch.equal(final[k], init[k]), k
    # both constraints met (N̄_L <= 16 = B, Σg ≈ 2.9 <= C = 3): no parameter moves at all
    init, final = _penalty_run(env, loaded, tmp_path / "c", budget=16, lambda_budget=10.0, lambda_layers=10.0)
    for k in PARAMS:
        assert torch.equal(final[k], init[k]), k


@pytest.mark.parametrize("forward", FORWARDS)
def test_met_penalties_add_nothing_to_the_task_gradient(env, loaded, tmp_path, forward):
    model, processor = loaded
    states = []
    for i, lam in enumerate((0.0, 100.0)):
        out = tmp_path / f"o{i}"
        # off_gate 0.01: gates that sum to less than max_reducers (sampled structures would start at 0.2)
        run(config(env, out, steps=2, budget=16, lambda_budget=lam, lambda_layers=lam, off_gate=0.01,
                   **FORWARDS[forward]),
            model=model,
            processor=processor)
        states.append(load_state(out)["space"])
    for k in PARAMS:
        assert torch.equal(states[0][k], states[1][k]), k


# --------------------------------------------------------------------------- resume, interrupt, NaN
@pytest.mark.parametrize("forward", FORWARDS)
def test_resume_is_bit_exact(env, loaded, tmp_path, forward):
    model, processor = loaded
    # batch 2 of 8 records: the six steps cross an epoch boundary (data position in the checkpoint); with the
    # relaxed forward the annealing (temperature, gate sharpening from step 3 on) crosses the interruption too
    kw = dict(steps=6, batch_size=2, checkpoint_every=2, **FORWARDS[forward])
    straight = tmp_path / "straight"
    run(config(env, straight, **kw), model=model, processor=processor)
    split = tmp_path / "split"
    first = run(config(env, split, stop_after=3, **kw), model=model, processor=processor)
    assert first.step == 3 and not first.completed and len(read_log(split)) == 3
    with pytest.raises(ValueError, match="already holds a search"):
        run(config(env, split, steps=6, batch_size=2, **FORWARDS[forward]), model=model, processor=processor)
    with pytest.raises(ValueError, match="differ from the checkpoint"):
        run(config(env, split, lr=2e-3, resume=True, **kw), model=model, processor=processor)
    second = run(config(env, split, resume=True, **kw), model=model, processor=processor)
    assert second.completed and second.step == 6
    a, b = load_state(straight), load_state(split)
    for k in PARAMS:
        assert torch.equal(a["space"][k], b["space"][k]), k
    assert a["data_state"] == b["data_state"]
    assert without_timing(read_log(straight)) == without_timing(read_log(split))
    assert (straight / "theta.json").read_text() == (split / "theta.json").read_text()


@pytest.mark.parametrize("forward", FORWARDS)
def test_ctrl_c_saves_a_checkpoint(env, loaded, tmp_path, forward):
    model, processor = loaded
    # relaxed forwards: steps 1-3 of 4 (hard finish: 4)
    name = "data_terms" if forward == "hard" else "relaxed_data_terms"
    original = getattr(objective, name)
    calls = []

    def interrupt_third(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kw)

    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(objective, name, interrupt_third)
        with pytest.raises(KeyboardInterrupt):
            run(config(env, out, steps=4, checkpoint_every=0, **FORWARDS[forward]), model=model,
                processor=processor)
    assert not is_patched(model)
    assert load_state(out)["step"] == 2 and len(read_log(out)) == 2
    result = run(config(env, out, steps=4, resume=True, **FORWARDS[forward]), model=model, processor=processor)
    assert result.step == 4 and [r["step"] for r in read_log(out)] == [1, 2, 3, 4]


def test_non_finite_loss_keeps_the_last_good_checkpoint(env, loaded, tmp_path):
    model, processor = loaded
    original = objective.data_terms
    calls = []

    def nan_at_third(*args, **kw):
        terms = original(*args, **kw)
        calls.append(1)
        if len(calls) == 3:
            terms["ce_sum"] = terms["ce_sum"] * float("nan")
        return terms

    out = tmp_path / "out"
    original_relaxed = objective.relaxed_data_terms

    def relaxed_nan_at_third(*args, **kw):
        terms = original_relaxed(*args, **kw)
        calls.append(1)
        if len(calls) == 3:
            terms["ce_sum"] = terms["ce_sum"] * float("nan")
        return terms

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(objective, "data_terms", nan_at_third)
        mp.setattr(objective, "relaxed_data_terms", relaxed_nan_at_third)
        with pytest.raises(NonFiniteLossError, match=r"step 3.*last good checkpoint \(step 2\)"):
            run(config(env, out, steps=5, checkpoint_every=1), model=model, processor=processor)
    state = load_state(out)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["space"].values())
    assert len(read_log(out)) == 2
    Theta.from_json(str(out / "theta.json"))


# --------------------------------------------------------------------------- more processes, other kernels
@pytest.mark.parametrize("forward", FORWARDS)
def test_torchrun_two_processes_equal_one_process(env, loaded, tmp_path, forward):
    model, processor = loaded
    single = tmp_path / "single"
    run(config(env, single, steps=3, batch_size=4, **FORWARDS[forward]), model=model, processor=processor)
    double = tmp_path / "double"
    environ = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1",
                   PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "eos_kernels.search", "--model", env.model, "--data", env.data, "--budget", "6", "--steps", "3",
           "--batch-size", "4", "--output", str(double), "--no-progress"]
    cmd += [a for k, v in FORWARDS[forward].items() for a in (f"--{k.replace('_', '-')}", v)]
    proc = subprocess.run(cmd, env=environ, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = load_state(single), load_state(double)
    assert b["world_size"] == 2
    for k in PARAMS:
        assert torch.allclose(a["space"][k], b["space"][k], rtol=0, atol=1e-5), k
    la, lb = read_log(single), read_log(double)
    assert [r["samples"] for r in la] == [r["samples"] for r in lb]
    for ra, rb in zip(la, lb):
        assert ra["answer_tokens"] == rb["answer_tokens"] and ra["active_layers"] == rb["active_layers"]
        for key in ("ce", "align", "total"):
            assert math.isclose(ra[key], rb[key], rel_tol=1e-5), key
    ta, tb = Theta.from_json(str(single / "theta.json")), Theta.from_json(str(double / "theta.json"))
    assert ta.layers == tb.layers and [r.keep for r in ta] == [r.keep for r in tb]


def test_triton_and_torch_operator_agree(env, loaded, tmp_path):
    """``impl="triton"`` (fused kernels, Triton's interpreter) vs ``"torch"``: two steps.

    Both compute the operator's forward and gradients in fp32 and agree to ~1e-6
    relative (tests/test_eos_reduce.py); AdamW's update depends on a gradient
    only through m / (√v + ε), which moves by about that relative error, so after
    two steps of lr ≤ 1e-3 the parameters agree far below 1e-5 (a component
    whose gradient changed sign would differ by ~1e-3 and fail).
    """
    model, processor = loaded
    outs = {}
    for impl in ("triton", "torch"):
        outs[impl] = tmp_path / impl
        run(config(env, outs[impl], steps=2, impl=impl, search_forward="hard"), model=model, processor=processor)
    a, b = load_state(outs["triton"]), load_state(outs["torch"])
    for k in PARAMS:
        assert torch.allclose(a["space"][k], b["space"][k], rtol=0, atol=1e-5), k
    for ra, rb in zip(read_log(outs["triton"]), read_log(outs["torch"])):
        for key in ("ce", "align", "total"):
            assert math.isclose(ra[key], rb[key], rel_tol=1e-5), key


# --------------------------------------------------------------------------- bad input
def _write(path, records):
    with open(path, "w") as f:
        json.dump(records, f)
    return str(path)


def test_bad_input_is_rejected_before_any_step(env, loaded, tmp_path, capsys):
    model, processor = loaded
    good = json.load(open(env.data))
    folder = os.path.dirname(env.data)
    cases = {
        "missing image": ([dict(good[0], image="images/nope.png")] + good[1:], r"image file\(s\) not found.*nope"),
        "gpt first": ([dict(good[0], conversations=good[0]["conversations"][::-1])], "malformed conversation"),
        "no answer": ([dict(good[0], conversations=good[0]["conversations"][:1])], "malformed conversation"),
        "no <image>": ([dict(good[0], conversations=[{"from": "human", "value": "what colour ?"},
                                                     {"from": "gpt", "value": "red"}])], "malformed conversation"),
        "not a list": ({"image": "x.png"}, "expected a JSON list"),
    }
    for i, (name, (records, message)) in enumerate(cases.items()):
        data = _write(os.path.join(folder, f"bad{i}.json"), records)
        out = tmp_path / f"o{i}"
        with pytest.raises(ValueError, match=message):
            run(config(env, out, data=data), model=model, processor=processor)
        assert not (out / "log.jsonl").exists(), name
        assert not is_patched(model)
    out = tmp_path / "budget"
    with pytest.raises(ValueError, match="budget 17 is larger than the 16 visual tokens"):
        run(config(env, out, budget=17), model=model, processor=processor)
    assert not (out / "log.jsonl").exists()
    with pytest.raises(ValueError, match="missing required option.*budget"):
        run(config(env, out, budget=None), model=model, processor=processor)
    with pytest.raises(ValueError, match="not a local Hugging Face checkpoint directory"):
        run(config(env, out, model=str(tmp_path / "no-such-model")))
    with pytest.raises(ValueError, match="cannot read the config"):
        run(config(env, out, model=os.path.dirname(env.data)))
    # unknown options: in Python, in a config file and on the command line
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bugdet'\]"):
        SearchConfig.from_dict({"bugdet": 4})
    from eos_kernels.search.cli import main

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("budget: 4\nlearning_rate: 0.1\n")
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(cfg_file), "--model", env.model, "--data", env.data])
    assert exc.value.code == 2 and "learning_rate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--model", env.model, "--data", env.data, "--bugdet", "4"])
    assert exc.value.code == 2 and "--bugdet" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--model", env.model, "--data", env.data, "--budget", "4", "--impl", "cuda"])
    assert exc.value.code == 2


def test_processor_and_data_file_errors_name_their_cause(env, loaded, tmp_path):
    """A checkpoint folder without tokenizer / processor files ended in transformers' "install
    sentencepiece or tiktoken"; a data file that is not UTF-8 in a UnicodeDecodeError naming no file."""
    import shutil

    from eos_kernels.search.data import load_dataset, load_processor

    model, processor = loaded
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(os.path.join(env.model, "config.json"), bare / "config.json")
    no_tokenizer = ("holds no tokenizer files (looked for tokenizer.json, tokenizer_config.json, tokenizer.model, "
                    "spiece.model, vocab.json, vocab.txt, *.tiktoken)")
    no_image_processor = "no image-processor files (looked for processor_config.json, preprocessor_config.json)"
    with pytest.raises(ValueError) as info:
        load_processor(str(bare))
    msg = str(info.value)
    assert msg.startswith(f"cannot load a processor from {bare}: the folder {no_tokenizer} and {no_image_processor}")
    assert "sentencepiece" not in msg and "install" not in msg
    # eos-search --model DIR loads the processor first (before the weights): the same cause
    with pytest.raises(ValueError, match=r"^model: cannot load a processor from .*: the folder holds no tokenizer"):
        run(config(env, tmp_path / "o", model=str(bare)))
    assert not (tmp_path / "o" / "log.jsonl").exists()
    # a tokenizer but no image processor: only that is named
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(env.model, name), bare / name)
    with pytest.raises(ValueError) as info:
        load_processor(str(bare))
    assert f"the folder holds {no_image_processor};" in str(info.value) and "no tokenizer" not in str(info.value)

    # the data file: valid JSON, but Latin-1 (é as the single byte 0xe9), beside the good one's images
    records = json.load(open(env.data, encoding="utf-8"))
    records[0] = dict(records[0], id="café")
    latin1 = os.path.join(os.path.dirname(env.data), "latin1.json")
    with open(latin1, "wb") as f:
        f.write(json.dumps(records, ensure_ascii=False).encode("latin-1"))
    pattern = rf"^data file {re.escape(latin1)} is not UTF-8 JSON: byte 0xe9 at offset \d+ cannot be decoded"
    with pytest.raises(ValueError, match=pattern):
        load_dataset(latin1, processor, num_visual_tokens=N_VIS, image_token_id=IMAGE_TOKEN_ID)
    with pytest.raises(ValueError, match=pattern):
        run(config(env, tmp_path / "o2", data=latin1), model=model, processor=processor)
    assert not is_patched(model)


# --------------------------------------------------------------------------- CLI with a config file, and --eval
def test_cli_config_file_and_eval(env, tmp_path, capsys):
    from eos_kernels.search.cli import main

    out = tmp_path / "out"
    cfg_file = tmp_path / "search.yaml"
    cfg_file.write_text(f"model: {env.model}\ndata: {env.data}\nbudget: 6\nsteps: 5\nbatch-size: 2\n"
                        f"output: {out}\nprogress: false\n")
    assert main(["--config", str(cfg_file), "--steps", "2"]) == 0  # the command line overrides the file
    assert [r["step"] for r in read_log(out)] == [1, 2]
    assert load_state(out)["config"]["batch_size"] == 2
    capsys.readouterr()

    held_out = write_llava_dataset(str(tmp_path / "heldout"), n=3, seed=7)
    theta_path = str(out / "theta.json")
    assert main(["--eval", theta_path, "none", "fastv-1-4", "--model", env.model, "--data", held_out,
                 "--output", str(out), "--batch-size", "2", "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "none" in printed
    report = json.load(open(out / "eval.json"))["results"]
    assert [r["spec"] for r in report] == [theta_path, "none", "fastv-1-4"]
    searched = Theta.from_json(theta_path)
    for r in report:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["answers"] == 4 and math.isfinite(r["answer_ce"])
    assert report[0]["tokens"]["final"] == searched.schedule(N_VIS)[-1][2] == report[0]["measured_final"]
    assert report[1]["tokens"]["final"] == N_VIS == report[1]["measured_final"]
    assert report[2]["tokens"]["final"] == 4 == report[2]["measured_final"]
    with pytest.raises(ValueError, match="neither a Θ JSON file nor a known preset"):
        evaluate(SearchConfig(model=env.model, data=held_out, output=str(out)), ["fastv"])


# --------------------------------------------------------------------------- patching helpers the search relies on
def test_suspended_and_prompt_lengths(loaded):
    from eos_kernels import patch_llava, unpatch_llava
    from eos_kernels.patching import suspended

    from _tiny_models import make_pixels, make_prompt

    model, _ = loaded
    ids = torch.stack([make_prompt(N_VIS, 3, 8, seed=0), make_prompt(N_VIS, 3, 8, seed=1)])
    px = make_pixels(2)
    with torch.no_grad():
        plain = model(input_ids=ids, pixel_values=px).logits
        patch_llava(model, Theta([Reducer(1, 8), Reducer(3, 4)]))
        try:
            reduced = model(input_ids=ids, pixel_values=px).logits
            with suspended(model):
                assert torch.equal(model(input_ids=ids, pixel_values=px).logits, plain)
            assert is_patched(model) and "suspended" in model.eos_report.note
            assert torch.equal(model(input_ids=ids, pixel_values=px).logits, reduced)
            # rating rows limited to the first 22 tokens == a 22-token prompt (the rule inside generate):
            # layers are causal, so the kept visual tokens are the same; the full input keeps its 6 later tokens
            with prompt_lengths(model, [22, 22]):
                model(input_ids=ids, pixel_values=px)
            limited = model.eos_report.stages[-1].kept_positions
            model(input_ids=ids[:, :22], pixel_values=px)
            assert torch.equal(limited[:, :-6], model.eos_report.stages[-1].kept_positions)
            assert limited[:, -6:].tolist() == [list(range(22, 28))] * 2
        finally:
            unpatch_llava(model)


def test_forward_parameters_follow_the_models_forward():
    """forward_inputs' parameter names (cached per forward function: inspect.signature is slow per batch) are the
    forward's own, per model class, and follow a forward replaced on the instance."""
    from torch import nn

    class A(nn.Module):
        def forward(self, input_ids, pixel_values=None, image_sizes=None, **kwargs):
            return input_ids

    class B(nn.Module):
        def forward(self, input_ids, attention_mask=None, *args):
            return input_ids

    a, b = A(), B()
    for _ in range(2):  # the second time from the cache
        assert objective._forward_parameters(a) == {"input_ids", "pixel_values", "image_sizes"}
        assert objective._forward_parameters(b) == {"input_ids", "attention_mask"}
    a.forward = lambda input_ids, token_type_ids=None: input_ids  # a plain function on the instance: not cached
    assert objective._forward_parameters(a) == {"input_ids", "token_type_ids"}
    a.forward = b.forward  # another module's bound method
    assert objective._forward_parameters(a) == {"input_ids", "attention_mask"}
