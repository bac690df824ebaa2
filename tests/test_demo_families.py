"""``eos-search --demo --model DIR`` on every family (issue 12, item 6; issue 19): the demo driver's comparison
(search, baselines at two budgets, held-out table) on tiny random checkpoints saved with ``save_pretrained``.

Qwen2.5-VL on the synthetic task (its 64 px images give every sample the same count, but the family's
counts are not fixed, so every reducing Θ is deployed as fractions); LLaVA-NeXT and LLaVA-OneVision on
``--data`` / ``--eval-data`` whose images have different sizes, so counts differ per image; InternVL likewise
(its tiles follow the aspect ratio); Gemma 3 on the synthetic task at its fixed 16 tokens per image (counts,
as for LLaVA-1.5). The numbers are those of random models: what is checked is that the driver runs, reports
what it deployed, and deploys it right.
"""
import json
import os
import sys

import pytest

pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(__file__))

from eos_kernels.demo.baselines import FAMILIES  # noqa: E402
from eos_kernels.demo.run import main  # noqa: E402
from eos_kernels.theta import Theta  # noqa: E402

from _tiny_families import (  # noqa: E402
    GEMMA_IMAGE_TOKENS, IMAGE_TOKEN_ID, save_tiny_gemma3, save_tiny_internvl, save_tiny_llava_next,
    save_tiny_llava_onevision, save_tiny_qwen,
)
from _tiny_models import write_ragged_llava_dataset  # noqa: E402
from _tiny_qwen3_vl import save_tiny_qwen3  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHORT = ["--steps", "2", "--batch-size", "2", "--eval-batch-size", "4", "--tune-questions", "4",
         "--max-new-tokens", "2", "--no-progress", "--impl", "torch", "--workers", "1"]


def _ragged_data(root, n, seed):
    return write_ragged_llava_dataset(root, n=n, seed=seed, offset=seed)


def _check_results(out, model_class, n_expected=None, vary=True):
    from eos_kernels.search.data import load_dataset, load_processor

    res = json.load(open(os.path.join(out, "demo_results.json")))
    # the first held-out image's own count: what the patched model kept of it is measured_final
    held = load_dataset(res["data"]["eval"], load_processor(res["model"]), num_visual_tokens=None,
                        image_token_id=IMAGE_TOKEN_ID)
    first = held.examples[0].num_visual_tokens
    assert res["model_class"] == model_class and res["visual_tokens_vary"] is vary
    n = res["num_visual_tokens"]
    if n_expected is not None:
        assert n == n_expected
    assert os.path.isfile(os.path.join(out, "demo_results.md"))
    rows = res["results"]
    fams = {r["family"] for r in rows}
    assert {"full", "eos-searched"} <= fams and fams & set(FAMILIES), fams
    assert {r["budget"] for r in rows if r["family"] == "eos-searched"} == set(res["budgets"])
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0
        theta = Theta.from_dict(r["theta_config"])
        assert Theta.from_json(os.path.join(out, r["theta_file"])) == theta
        # deployed as fractions of the schedule at N0 (a fixed count: as counts), so the reported schedule is
        # the one at N0
        assert all(red.is_fraction == vary for red in theta), r["config"]
        assert [list(s) for s in theta.schedule(n)] == r["tokens"]["schedule"]
        if len(theta):  # each image keeps its share of its own tokens
            assert r["measured_final"] == theta.schedule(first)[-1][2], (r["config"], first, n)
        if r["family"] != "full":
            assert r["tokens"]["final"] <= r["budget"], r["config"]
    assert all(r["prefill_ms"] > 0 for r in rows if r["config"] in ("full", *(f"eos-searched@{b}" for b in
                                                                           res["budgets"])))
    # the searched Θ is a fraction Θ too where counts vary
    for info in res["searches"].values():
        assert all(isinstance(red["keep"], float) == vary for red in info["searched_theta"]["reducers"])
    return res


def test_demo_driver_on_qwen25_synthetic_task(tmp_path):
    model = save_tiny_qwen(str(tmp_path / "qwen"), version="2.5")
    out = str(tmp_path / "out")
    rc = main(["--demo", "--model", model, "--output", out, "--search-images", "4", "--eval-images", "4",
               "--budget", "3", "--second-budget", "6"] + SHORT)
    assert rc == 0
    res = _check_results(out, "Qwen2_5_VLForConditionalGeneration")
    assert res["data"]["synthetic"] is True and len(res["held_out_visual_counts"]) == 1


def test_demo_driver_on_qwen3_vl_moe_own_ragged_data(tmp_path, capsys):
    """Qwen3-VL-MoE (DeepStack after layers 0-2, reducers of the search at layers 1 and 3) on images of
    different sizes: the driver searches, deploys and reports as on the other families."""
    model = save_tiny_qwen3(str(tmp_path / "m"), moe=True)
    search = _ragged_data(tmp_path / "search", 6, seed=0)
    held = _ragged_data(tmp_path / "held", 6, seed=1)
    out = str(tmp_path / "out")
    rc = main(["--demo", "--model", model, "--data", search, "--eval-data", held, "--output", out,
               "--budget", "4", "--second-budget", "8"] + SHORT)
    assert rc == 0, capsys.readouterr().err
    res = _check_results(out, "Qwen3VLMoeForConditionalGeneration")
    assert len(res["held_out_visual_counts"]) >= 3, res["held_out_visual_counts"]


def test_demo_driver_on_gemma3_synthetic_task(tmp_path):
    model = save_tiny_gemma3(str(tmp_path / "gemma3"))
    out = str(tmp_path / "out")
    rc = main(["--demo", "--model", model, "--output", out, "--search-images", "4", "--eval-images", "4",
               "--budget", "3", "--second-budget", "6"] + SHORT)
    assert rc == 0
    res = _check_results(out, "Gemma3ForConditionalGeneration", n_expected=GEMMA_IMAGE_TOKENS, vary=False)
    assert res["data"]["synthetic"] is True and res["held_out_visual_counts"] == [GEMMA_IMAGE_TOKENS]


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "internvl"])
def test_demo_driver_on_anyres_llava_own_ragged_data(tmp_path, capsys, family):
    if family == "llava_next":
        model, cls = save_tiny_llava_next(str(tmp_path / "m")), "LlavaNextForConditionalGeneration"
    elif family == "internvl":  # tiles by the aspect ratio
        model, cls = save_tiny_internvl(str(tmp_path / "m")), "InternVLForConditionalGeneration"
    else:
        model, cls = save_tiny_llava_onevision(str(tmp_path / "m")), "LlavaOnevisionForConditionalGeneration"
    search = _ragged_data(tmp_path / "search", 6, seed=0)
    held = _ragged_data(tmp_path / "held", 6, seed=1)
    out = str(tmp_path / "out")
    rc = main(["--demo", "--model", model, "--data", search, "--eval-data", held, "--output", out,
               "--budget", "4", "--second-budget", "8"] + SHORT)
    assert rc == 0, capsys.readouterr().err
    res = _check_results(out, cls)
    counts = res["held_out_visual_counts"]
    assert len(counts) >= 3, counts  # the images really give different counts
    assert res["num_visual_tokens"] not in counts  # N0 is their mean: every image is at another count
    assert res["data"]["synthetic"] is False and not os.path.exists(os.path.join(out, "data"))
    assert "fractions" in open(os.path.join(out, "demo_results.md")).read()


def test_demo_driver_rejects_bad_options_before_searching(tmp_path, capsys):
    model = save_tiny_qwen(str(tmp_path / "qwen"), version="2.5")
    data = _ragged_data(tmp_path / "d", 3, seed=0)
    out = str(tmp_path / "out")
    assert main(["--demo", "--model", model, "--data", data, "--output", out] + SHORT) == 2
    assert "--data and --eval-data go together" in capsys.readouterr().err
    assert main(["--demo", "--model", model, "--data", data, "--eval-data", str(tmp_path / "nope.json"),
                 "--output", out] + SHORT) == 2
    assert "--eval-data: no such file" in capsys.readouterr().err
    assert main(["--demo", "--model", model, "--data", data, "--eval-data", data, "--eval-images", "3",
                 "--output", out] + SHORT) == 2
    assert "size the synthetic task" in capsys.readouterr().err
    for bad, said in ((["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
                      (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
                      (["--lr", "nan"], "--lr must be a finite number > 0"),
                      (["--local-moves-every", "-1"], "--local-moves-every must be >= 0"),
                      (["--local-moves-every", "2"], "--local-moves-every needs --search-forward hard"),
                      (["--workers", "0"], "--workers must be >= 1"),
                      (["--budget", "0"], "--budget must be >= 1")):
        assert main(["--demo", "--model", model, "--data", data, "--eval-data", data, "--output", out]
                    + SHORT + bad) == 2, bad
        assert said in capsys.readouterr().err, bad
    assert main(["--demo", "--model", model, "--image-folder", str(tmp_path), "--output", out] + SHORT) == 2
    assert "--image-folder applies to --data" in capsys.readouterr().err
    assert main(["--demo", "--model", model, "--data", data, "--eval-data", data, "--budget", "100000",
                 "--output", out] + SHORT) == 2
    err = capsys.readouterr().err
    assert "must be in 1.." in err and "mean" in err, err
    assert main(["--demo", "--model", str(tmp_path / "no-model"), "--output", out,
                 "--search-images", "2", "--eval-images", "2"] + SHORT) == 2
    assert "not a local Hugging Face checkpoint" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "theta.json"))


def test_defaults_follow_the_model():
    """The demo's grid and search on the built-in model; eos-search's own defaults on a --model checkpoint."""
    from eos_kernels.demo.run import DEMO_BUDGETS, QUICK_BUDGETS, _resolve_defaults, build_parser
    from eos_kernels.search import SearchConfig

    d = SearchConfig()
    builtin = build_parser().parse_args(["--demo"])
    _resolve_defaults(builtin, 64)
    assert (tuple(builtin.budgets), builtin.steps, builtin.batch_size, builtin.lr) == (DEMO_BUDGETS, 200, 8, 3e-2)
    quick = build_parser().parse_args(["--demo", "--quick"])
    _resolve_defaults(quick, 64)
    assert tuple(quick.budgets) == QUICK_BUDGETS and quick.steps < builtin.steps
    own = build_parser().parse_args(["--demo", "--model", "m", "--budget", "40"])
    _resolve_defaults(own, 64)
    assert (own.budgets, own.steps, own.batch_size, own.lr, own.workers) == ([40], d.steps, d.batch_size, d.lr, 1)
    given = build_parser().parse_args(["--demo", "--model", "m", "--budgets", "8", "4", "--budget", "4",
                                       "--second-budget", "12", "--steps", "7", "--lr", "0.5"])
    _resolve_defaults(given, 64)
    assert (given.budgets, given.steps, given.lr) == ([4, 8, 12], 7, 0.5)
    with pytest.raises(ValueError, match="--model needs --budgets"):
        _resolve_defaults(build_parser().parse_args(["--demo", "--model", "m"]), 64)
