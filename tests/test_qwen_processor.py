"""The search's data pipeline with Qwen2-VL / Qwen2.5-VL's *full* processor (needs torchvision).

In transformers 5.x ``AutoProcessor`` builds ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor``
only with torchvision (their video processor), and no torchvision wheel imports beside the
torch 2.13.0 CPU wheel CI pins: there :func:`eos_kernels.search.data.load_processor` falls
back to :class:`~eos_kernels.search.data.TokenizerAndImageProcessor`, which
``tests/test_search_families.py`` covers. This module covers the other path, so **in CI
(and wherever torchvision cannot be imported) the whole module is skipped**; run it where
torchvision imports, e.g. a venv with torch 2.14.1 + torchvision 0.29.1.

For tiny random Qwen2-VL and Qwen2.5-VL checkpoints (``tests/_tiny_families.py``) and
images of different sizes (so different visual-token counts):

- ``load_processor`` gives the real processor;
- the ids :func:`~eos_kernels.search.data.load_dataset` builds -- the prompt and the whole
  conversation -- equal the processor's own (its chat template, placeholder expansion and
  tokenizer, run by ``apply_chat_template(tokenize=True)`` on the image), and the batch's
  ``pixel_values`` / ``image_grid_thw`` equal the processor's;
- the fallback built from the same folder gives the same ids, labels, prompt lengths and
  image inputs;
- a 2-step :func:`eos_kernels.search.run` with the processor loaded from the checkpoint
  (the full one) completes and writes ``theta.json``.
"""
import json
import os
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip(
    "torchvision", exc_type=ImportError,
    reason="Qwen2(.5)-VL's full processor needs torchvision in transformers 5.x (its video processor); "
           "without it load_processor falls back to TokenizerAndImageProcessor (tests/test_search_families.py)")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

from eos_kernels.search import SearchConfig, run  # noqa: E402
from eos_kernels.search import data as search_data  # noqa: E402
from eos_kernels.search.data import TokenizerAndImageProcessor, load_dataset, load_processor  # noqa: E402
from eos_kernels.theta import Theta  # noqa: E402

from _tiny_families import IMAGE_TOKEN_ID, save_tiny_qwen  # noqa: E402
from _tiny_models import write_llava_dataset  # noqa: E402

#: (width, height): 8 to 16 visual tokens with the tiny processor's 32 x 32 pixel cap, all different grids
SIZES = [(20, 28), (40, 24), (64, 64), (33, 17), (100, 30), (56, 56)]
PROCESSORS = {"2": "Qwen2VLProcessor", "2.5": "Qwen2_5_VLProcessor"}


def _write_data(root):
    from PIL import Image

    path = write_llava_dataset(str(root), n=len(SIZES), seed=0)  # every third record has two turns
    for i, rec in enumerate(json.load(open(path))):
        full = os.path.join(str(root), rec["image"])
        with Image.open(full) as im:
            im.convert("RGB").resize(SIZES[i]).save(full)
    return path


@pytest.fixture(scope="module", params=sorted(PROCESSORS))
def env(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen" + request.param.replace(".", ""))
    model = save_tiny_qwen(str(root / "model"), version=request.param, num_layers=4)
    processor = load_processor(model)
    if isinstance(processor, TokenizerAndImageProcessor):  # torchvision imports, yet transformers refused
        pytest.skip(f"transformers built no full Qwen processor here ({processor!r})")
    return request.param, model, _write_data(root / "data"), processor


def _messages(turns, image):
    """The conversation as a Qwen chat, written independently of eos_kernels' renderer."""
    msgs = []
    for who, value in turns:
        if who == "human":
            content = []
            if "<image>" in value:
                content.append({"type": "image", "image": image})
                value = value.replace("<image>\n", "").replace("<image>", "").strip()
            msgs.append({"role": "user", "content": content + [{"type": "text", "text": value}]})
        else:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": value}]})
    return msgs


def _own(processor, msgs, generation_prompt):
    return processor.apply_chat_template(msgs, add_generation_prompt=generation_prompt, tokenize=True,
                                         return_dict=True, return_tensors="pt")


def test_load_processor_gives_the_full_qwen_processor(env):
    version, _, _, processor = env
    assert type(processor).__name__ == PROCESSORS[version]
    assert processor.chat_template and processor.image_processor is not None
    assert getattr(processor, "video_processor", None) is not None


def test_dataset_ids_and_image_inputs_equal_the_processors_own(env):
    from PIL import Image

    _, _, data, processor = env
    ds = load_dataset(data, processor, num_visual_tokens=None, image_token_id=IMAGE_TOKEN_ID)
    assert ds.num_visual_tokens is None and len(set(ds.visual_counts)) >= 4, ds.visual_counts
    records = json.load(open(data))
    for ex in ds.examples:
        turns = [(t["from"], t["value"]) for t in records[ex.index]["conversations"]]
        with Image.open(ex.image) as im:
            image = im.convert("RGB")
        prompt = _own(processor, _messages(turns[:1], image), True)
        assert prompt["input_ids"][0].tolist() == ex.input_ids[:ex.prompt_length], ex.index
        whole = _own(processor, _messages(turns, image), False)
        assert whole["input_ids"][0].tolist() == ex.input_ids, ex.index
        assert int((whole["input_ids"] == IMAGE_TOKEN_ID).sum()) == ex.num_visual_tokens
        mine = ds.image_inputs([ex.image])
        assert torch.equal(mine["pixel_values"], prompt["pixel_values"]), ex.index
        assert torch.equal(mine["image_grid_thw"], prompt["image_grid_thw"]), ex.index
    # a collated batch: flat patches of all the images in order, one grid row each
    batch = ds.collate(list(range(len(ds))))
    own = processor.image_processor([Image.open(e.image).convert("RGB") for e in ds.examples], return_tensors="pt")
    assert torch.equal(batch.pixel_values, own["pixel_values"])
    assert torch.equal(batch.image_inputs["image_grid_thw"], own["image_grid_thw"])


def test_fallback_builds_the_same_examples_and_image_inputs(env):
    from transformers import AutoTokenizer

    from eos_kernels.search.data import load_image_processor

    _, model, data, processor = env
    fallback = TokenizerAndImageProcessor(AutoTokenizer.from_pretrained(model), load_image_processor(model))
    full = load_dataset(data, processor, num_visual_tokens=None, image_token_id=IMAGE_TOKEN_ID)
    alone = load_dataset(data, fallback, num_visual_tokens=None, image_token_id=IMAGE_TOKEN_ID)
    for a, b in zip(full.examples, alone.examples):
        assert (a.input_ids, a.labels, a.prompt_length, a.turns, a.num_visual_tokens) == \
               (b.input_ids, b.labels, b.prompt_length, b.turns, b.num_visual_tokens), a.index
    x, y = full.collate(list(range(len(full)))), alone.collate(list(range(len(alone))))
    assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels)
    # the same image-processor class here (the torchvision backend with torchvision): equal pixels
    assert type(fallback.image_processor) is type(processor.image_processor)
    assert torch.equal(x.pixel_values, y.pixel_values)
    assert torch.equal(x.image_inputs["image_grid_thw"], y.image_inputs["image_grid_thw"])


def test_short_search_runs_with_the_full_processor(env, tmp_path, monkeypatch, one_torch_thread):
    version, model, data, _ = env
    loaded = []

    def spy(path):
        loaded.append(real(path))
        return loaded[-1]

    real = search_data.load_processor
    monkeypatch.setattr(search_data, "load_processor", spy)  # the driver imports it at call time
    out = tmp_path / "out"
    result = run(SearchConfig(model=model, data=data, output=str(out), budget=6, steps=2, batch_size=4,
                              micro_batch_size=2, progress=False))
    assert [type(p).__name__ for p in loaded] == [PROCESSORS[version]]
    assert result.completed and result.step == 2
    theta = Theta.from_json(str(out / "theta.json"))
    assert theta.reducers and all(r.is_fraction for r in theta.reducers)
    log = [json.loads(line) for line in open(out / "log.jsonl") if line.strip()]
    assert [r["step"] for r in log] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["total"])) for r in log)
