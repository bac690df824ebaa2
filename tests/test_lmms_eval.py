"""The lmms-eval plugin ``eos`` (issue 18) on tiny random models of every family and on the demo model.

Runs where lmms-eval is installed (CI installs the ``eval`` extra and lmms-eval for this file; see
the README's "Benchmarks with lmms-eval"). The plugin is driven here through lmms-eval's own request
objects (``Instance``) with a task dict of plain docs, as lmms-eval's evaluator drives it; the command
line end to end is ``tests/test_lmms_eval_cli.py``.
"""
import json
import os
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

pytest.importorskip("lmms_eval")

sys.path.insert(0, os.path.dirname(__file__))

from lmms_eval.api.instance import Instance  # noqa: E402

from eos_kernels.integrations.lmms_eval import budget  # noqa: E402
from eos_kernels.integrations.lmms_eval.model import EOS, EOSChat  # noqa: E402
from eos_kernels.search.data import PromptEncoder, load_dataset  # noqa: E402
from eos_kernels.search.model_loading import load_model  # noqa: E402
from eos_kernels.theta import Theta  # noqa: E402

from _tiny_families import (  # noqa: E402
    save_tiny_gemma3, save_tiny_internvl, save_tiny_llava_next, save_tiny_llava_onevision, save_tiny_qwen,
)
from _tiny_models import write_ragged_llava_dataset  # noqa: E402
from _tiny_qwen3_vl import save_tiny_qwen3  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: every family eos_kernels.patch supports (the images of write_ragged_llava_dataset have different sizes: different
#: visual counts where the family has no fixed count)
FAMILIES = ("llava", "qwen2.5", "qwen2", "llava_next", "llava_onevision", "qwen3", "qwen3_moe", "internvl", "gemma3")
#: the families whose stock model takes no video inputs
NO_VIDEO = ("llava", "llava_next", "internvl", "gemma3")
#: a pruning Θ every family can run (fractions: each image keeps half of its own tokens after layer 1)
PRUNE = "fastv-1-0.5"


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, tmp_path_factory):
    from eos_kernels.demo.build import checkpoint_path

    root = tmp_path_factory.mktemp(request.param.replace(".", ""))
    if request.param == "llava":
        model_dir = checkpoint_path()  # LLaVA-1.5: the demo checkpoint (fixed 64 visual tokens)
    elif request.param.startswith("qwen3"):
        model_dir = save_tiny_qwen3(str(root / "model"), moe=request.param == "qwen3_moe")
    elif request.param == "internvl":
        model_dir = save_tiny_internvl(str(root / "model"))
    elif request.param == "gemma3":
        model_dir = save_tiny_gemma3(str(root / "model"))
    elif request.param.startswith("qwen"):
        model_dir = save_tiny_qwen(str(root / "model"), version=request.param[len("qwen"):])
    elif request.param == "llava_onevision":
        model_dir = save_tiny_llava_onevision(str(root / "model"))
    else:
        model_dir = save_tiny_llava_next(str(root / "model"))
    data = write_ragged_llava_dataset(root / "data")
    model, processor = load_model(model_dir, torch.device("cpu"), torch.float32)
    return SimpleNamespace(name=request.param, model_dir=model_dir, data=data, model=model.eval(),
                           processor=processor, records=json.load(open(data)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The LLaVA-1.5 family alone (the demo checkpoint), for the tests that need one model."""
    from eos_kernels.demo.build import checkpoint_path

    root = tmp_path_factory.mktemp("demo")
    data = write_ragged_llava_dataset(root / "data")
    model, processor = load_model(checkpoint_path(), torch.device("cpu"), torch.float32)
    return SimpleNamespace(name="llava", model_dir=checkpoint_path(), data=data, model=model.eval(),
                           processor=processor, records=json.load(open(data)))


def _fixed(fam):
    """The family's fixed visual count per image (the demo LLaVA's 64, Gemma 3's), as eos-search takes it; None
    where each image has its own."""
    from eos_kernels.integrations.auto import adapter_for

    fixed = adapter_for(fam.model).visual_tokens_per_image(fam.model)
    assert (fixed is not None) == (fam.name in ("llava", "gemma3")), (fam.name, fixed)
    return fixed


def _docs(fam, text_only=(5,)):
    """One doc per record: its image and first question; ``text_only`` records lose their image."""
    from PIL import Image

    docs = []
    for i, rec in enumerate(fam.records):
        image = None
        if i not in text_only:
            with Image.open(os.path.join(os.path.dirname(fam.data), rec["image"])) as im:
                image = im.convert("RGB")
        question = rec["conversations"][0]["value"].replace("<image>\n", "")
        docs.append({"image": image, "question": question, "record": rec})
    return docs


def _visual(doc):
    return [] if doc["image"] is None else [doc["image"]]


def _simple_requests(docs, gen=None, task="t"):
    gen = {"max_new_tokens": 4, "until": ["\n\n"]} if gen is None else gen
    return [Instance("generate_until", (d["question"], dict(gen), _visual, i, task, "test"), 0,
                     {"task": task, "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]


def _plugin(fam, theta="none", cls=EOS, batch_size=1, docs=None):
    lm = cls.from_model(fam.model, fam.processor, theta, batch_size=batch_size, name=fam.name)
    lm.task_dict = {"t": {"test": docs or []}}
    return lm


def test_the_model_is_registered_with_lmms_eval():
    from lmms_eval import models

    assert "eos" in models.list_available_models()
    assert models.get_model("eos") is EOSChat  # lmms-eval prefers the chat class
    assert models.get_model("eos", force_simple=True) is EOS


def test_prompts_are_eos_search_prompts(fam):
    """The plugin's prompt ids and image inputs for a task's (question, image) are the ids and image inputs
    eos-search generates from for the same record: both interfaces, first and (chat) second turns."""
    fixed = _fixed(fam)
    ds = load_dataset(fam.data, fam.processor, num_visual_tokens=fixed, image_token_id=fam.model.config.image_token_id)
    lm = _plugin(fam, docs=_docs(fam, text_only=()))
    chat = _plugin(fam, cls=EOSChat, docs=lm.task_dict["t"]["test"])
    for i, (ex, doc) in enumerate(zip(ds.examples, lm.task_dict["t"]["test"])):
        turns, images = lm._simple_conversation(doc["question"], _visual, "t", "test", i)
        assert lm.encoder.prompt(turns, images) == ex.input_ids[:ex.turns[0][0]], (fam.name, i)
        got = lm.encoder.image_inputs(images)
        want = ds.image_inputs([ex.image])
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
        # the chat interface: the record's whole conversation up to each gpt turn
        conv = doc["record"]["conversations"]
        for t in range(len(ex.turns)):
            messages = []
            for k, turn in enumerate(conv[:2 * t + 1]):
                text = turn["value"].replace("<image>\n", "")
                content = ([{"type": "image", "url": doc["image"]}] if "<image>" in turn["value"] else []) + \
                    [{"type": "text", "text": text}]
                messages.append({"role": "user" if k % 2 == 0 else "assistant", "content": content})
            turns, images = chat._chat_conversation(messages, "t", "test", i)
            assert chat.encoder.prompt(turns, images) == ex.input_ids[:ex.turns[t][0]], (fam.name, i, t)


def test_batch_four_equals_batch_one_and_every_answer_carries_its_budget(fam):
    """One generate per batch (left padding, ragged counts, a text-only prompt among image prompts): the
    greedy answers at batch 4 are those at batch 1, and each sample's budget is the patched model's report
    of its prefill = Theta.token_report at the sample's own visual and text counts."""
    docs = _docs(fam)
    answers, records = {}, {}
    for bs in (1, 4):
        lm = _plugin(fam, PRUNE, batch_size=bs, docs=docs)
        out = lm.generate_until(_simple_requests(docs))
        answers[bs] = [r.text for r in out]
        records[bs] = {r["doc_id"]: r for r in lm.records}
        assert lm.timing["batches"] == (len(docs) + bs - 1) // bs
        for i, r in enumerate(out):
            tc = r.token_counts.to_dict()
            assert set(budget.FIELDS) <= set(tc) and tc["input_tokens"] == tc["text_tokens"] + tc["visual_tokens"]
            for f in budget.FIELDS:
                if f != "prefill_ms":
                    assert tc[f] == records[bs][i][f]
    assert answers[4] == answers[1]
    theta = Theta.fastv(1, 0.5)
    L = lm.num_layers
    cfg = fam.model.config.text_config
    ffn = cfg.intermediate_size
    if getattr(cfg, "num_experts", 0):  # Qwen3-VL-MoE: the active experts' width (every layer is sparse here)
        ffn = cfg.num_experts_per_tok * cfg.moe_intermediate_size
    for i, r in records[1].items():
        assert {k: v for k, v in records[4][i].items() if k != "prefill_ms"} == \
            {k: v for k, v in r.items() if k != "prefill_ms"}
        assert r["prefill_ms"] > 0
        if docs[i]["image"] is None:
            assert (r["visual_tokens"], r["final_visual_tokens"], r["prefill_flops_ratio"]) == (0, 0, 1.0)
            continue
        want = theta.token_report(r["visual_tokens"], L, r["text_tokens"], hidden_size=cfg.hidden_size,
                                  intermediate_size=ffn)
        assert (r["final_visual_tokens"], r["mean_leaving_visual_tokens"], r["mean_processed_visual_tokens"],
                r["prefill_flops"], r["prefill_flops_full"]) == \
            (want["final"], want["mean_leaving"], want["mean_processed"], want["prefill_flops"],
             want["prefill_flops_full"])
    summary = lm.budget_summary()["t"]
    rs = list(records[4].values())
    assert summary["samples"] == len(docs)
    assert summary["final_visual_tokens"] == pytest.approx(sum(r["final_visual_tokens"] for r in rs) / len(rs))
    assert summary["prefill_flops_ratio"] == pytest.approx(
        sum(r["prefill_flops"] for r in rs) / sum(r["prefill_flops_full"] for r in rs))


def test_theta_none_is_the_stock_model(fam):
    """theta=none patches nothing that changes a token: the answers are the stock model's greedy answers."""
    from eos_kernels.patching import unpatch_model

    docs = _docs(fam)[:3]
    lm = _plugin(fam, "none", batch_size=3, docs=docs)
    got = [r.text for r in lm.generate_until(_simple_requests(docs))]
    assert all(r["final_visual_tokens"] == r["visual_tokens"] and r["prefill_flops_ratio"] == 1.0
               for r in lm.records)
    unpatch_model(fam.model)
    tok = lm.encoder.tokenizer
    want = []
    for i, d in enumerate(docs):
        turns, images = lm._simple_conversation(d["question"], _visual, "t", "test", i)
        inputs = lm._inputs([lm.encoder.prompt(turns, images)], lm._image_inputs(images))
        with torch.no_grad():
            out = fam.model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=tok.eos_token_id,
                                     pad_token_id=lm.encoder.pad_token_id)
        gen = out[0, inputs["input_ids"].shape[1]:].tolist()
        gen = gen[:gen.index(tok.eos_token_id)] if tok.eos_token_id in gen else gen
        want.append(tok.decode(gen, skip_special_tokens=True))
    assert got == want


def test_loglikelihood_is_eos_search_answer_ce(fam):
    """loglikelihood of a record's answer = minus eos-search's teacher-forced answer CE sum on that record
    (same tokens, same prompt-only rating of the visual tokens), batched or not."""
    from eos_kernels.integrations.auto import adapter_for
    from eos_kernels.search.objective import data_terms

    fixed = _fixed(fam)
    ds = load_dataset(fam.data, fam.processor, num_visual_tokens=fixed, image_token_id=fam.model.config.image_token_id)
    docs = _docs(fam, text_only=())
    single = [i for i, ex in enumerate(ds.examples) if len(ex.turns) == 1]
    reqs = [Instance("loglikelihood", (docs[i]["question"], docs[i]["record"]["conversations"][1]["value"], _visual,
                                       i, "t", "test"), 0, {"task": "t", "doc_id": i, "repeats": 1}) for i in single]
    lls = {}
    for bs in (1, 4):
        lm = _plugin(fam, PRUNE, batch_size=bs, docs=docs)
        lls[bs] = lm.loglikelihood(reqs)
    for (ll1, g1), (ll4, g4) in zip(lls[1], lls[4]):
        assert ll4 == pytest.approx(ll1, rel=1e-5, abs=1e-4) and g1 == g4
    for k, i in enumerate(single):
        batch = ds.collate([i])
        with torch.no_grad():
            ce = float(data_terms(fam.model, batch, None, align=False, adapter=adapter_for(fam.model))["ce_sum"])
        assert lls[1][k][0] == pytest.approx(-ce, rel=1e-5, abs=1e-4), (fam.name, i)


def test_bad_input_is_refused_before_any_sample(tmp_path):
    from eos_kernels.demo.build import checkpoint_path

    ck = checkpoint_path()
    cases = [
        (dict(pretrained=ck, theta="sparsevlm-v3-64"), "theta='sparsevlm-v3-64'"),   # unknown preset
        (dict(pretrained=ck, theta="fastv-8-4"), "layer 8 does not exist in a model with 8 layers"),
        (dict(pretrained=ck, theta="none", temprature=0.5), "unknown model argument(s) temprature"),
        (dict(pretrained=ck, batch_size="auto"), "batch_size must be an integer >= 1"),
        (dict(pretrained=ck, dtype="fp16"), "dtype='fp16'"),
        (dict(pretrained=ck, num_frames="8", fps="1"), "num_frames=8 and fps=1.0 are mutually exclusive"),
        (dict(pretrained=ck, fps="fast"), "fps must be a number > 0"),
        (dict(pretrained=ck, video_backend="ffmpeg"), "video_backend='ffmpeg' is not one of"),
        (dict(pretrained=str(tmp_path / "missing")), "neither a checkpoint folder nor a Hub id"),
        (dict(), "pretrained= is required"),
    ]
    theta_json = tmp_path / "deep.json"
    Theta.fastv(12, 4).to_json(str(theta_json))
    cases.append((dict(pretrained=ck, theta=str(theta_json)), "layer 12 does not exist"))
    # a checkpoint of an unsupported class
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=32)).save_pretrained(str(tmp_path / "llama"))
    cases.append((dict(pretrained=str(tmp_path / "llama")), "not a supported model"))
    for kwargs, message in cases:
        with pytest.raises(ValueError) as err:
            EOS(**kwargs)
        assert message in str(err.value), (kwargs, str(err.value))


def _video_request(path):
    return [Instance("generate_until", ("q", {}, lambda doc: [str(path)], 0, "t", "test"), 0,
                     {"task": "t", "doc_id": 0, "repeats": 1})]


def test_video_requests_need_torchvision_and_a_video_family(fam, tmp_path):
    """A video (lmms-eval hands it over as a file path) for a family whose model takes none is a ValueError; for
    a video family without torchvision (CI) an ImportError naming it. tests/test_lmms_eval_video.py runs the
    videos themselves where torchvision imports."""
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\0" * 64)  # the checks come before any decoding
    lm = _plugin(fam, docs=_docs(fam)[:1])
    if fam.name in NO_VIDEO:
        with pytest.raises(ValueError, match=f"{type(fam.model).__name__} takes no video inputs"):
            lm.generate_until(_video_request(clip))
        return
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        pytest.skip("torchvision imports here: tests/test_lmms_eval_video.py covers videos")
    with pytest.raises(ImportError, match="only with torchvision: install the torchvision release"):
        lm.generate_until(_video_request(clip))


def test_missing_visuals_and_mismatched_placeholders_are_clear_errors(demo, tmp_path):
    fam = demo
    docs = _docs(fam)[:2]
    lm = _plugin(fam, docs=docs)
    with pytest.raises(ValueError, match="is not a file"):
        lm.generate_until(_video_request(tmp_path / "missing.mp4"))
    two = [Instance("generate_until", ("<image> <image> q", {}, _visual, 0, "t", "test"), 0,
                    {"task": "t", "doc_id": 0, "repeats": 1})]
    with pytest.raises(ValueError, match="holds 2 <image> for 1 image"):
        lm.generate_until(two)
    with pytest.raises(ValueError, match="2 <image> placeholder"):
        PromptEncoder(fam.processor, image_token_id=fam.model.config.image_token_id, num_visual_tokens=64).prompt(
            [("human", "<image>\n<image>\nq")], [docs[0]["image"]])


def test_budget_reaches_the_results_and_reads_back(demo):
    """clean() writes every task's budget through lmms-eval's log_metrics (the results file's "throughput"),
    and budget_from_results / format_results read it back next to the scores."""
    from lmms_eval.models.model_utils.gen_metrics import reset_logged_metrics, summarize_logged_metrics

    fam = demo
    docs = _docs(fam)
    lm = _plugin(fam, PRUNE, batch_size=2, docs=docs)
    lm.generate_until(_simple_requests(docs))
    want = lm.budget_summary()
    reset_logged_metrics()
    lm.clean()
    results = {"throughput": summarize_logged_metrics(), "results": {"t": {"alias": "t", "acc,none": 0.5},
                                                                     "other": {"alias": "other", "acc,none": 1.0}},
               "config": {"model_args": f"pretrained=x,theta={PRUNE}"}}
    got = budget.budget_from_results(results)
    assert got.keys() == {"t"} and got["t"] == pytest.approx(want["t"])
    assert results["throughput"]["total_gen_tokens"] == sum(r["output_tokens"] for r in lm.records)
    table = budget.format_results(results)
    row = next(line for line in table.splitlines() if line.startswith("| t "))
    assert "0.5" in row and f"{want['t']['prefill_flops_ratio']:.4g}" in row
    assert "no budget recorded" in next(line for line in table.splitlines() if line.startswith("| other"))


def _record_inputs(lm):
    """Wrap the plugin: every batch's (images, model inputs) in a list, and count the image processor's calls.
    A batch's images are those of the conversations its preparation (``_prepare``, on the prefetch thread, in
    batch order) handed over before the request loop built the batch's inputs."""
    seen, calls, prepared = [], [], []
    prepare, inputs, image_inputs = lm._prepare, lm._inputs, lm.encoder.image_inputs

    def record_prepare(*args):
        convs, image_in = prepare(*args)
        prepared.append(lm._images(convs))
        return convs, image_in

    def record(*args, **kwargs):
        out = inputs(*args, **kwargs)
        seen.append((prepared[len(seen)], out))
        return out

    def count(images):
        calls.append(len(images))
        return image_inputs(images)

    lm._prepare, lm._inputs, lm.encoder.image_inputs = record_prepare, record, count
    return seen, calls


@pytest.mark.parametrize("bs", [1, 3])
def test_image_chunks_give_each_batch_its_own_image_inputs(demo, bs):
    """The images of several batches go through the image processor in one call (IMAGE_CHUNK) where its rows
    do not depend on the call: every batch still gets, bit for bit, the inputs of a call on its own images, and
    the answers are those of one call per batch."""
    from eos_kernels.integrations.lmms_eval import model as plugin

    fam = demo
    docs = _docs(fam) * 3  # 18 docs, one text-only doc in every 6
    lm = _plugin(fam, PRUNE, batch_size=bs, docs=docs)
    assert lm._chunk_images is None  # a fixed-size processor: checked at the first chunk
    seen, calls = _record_inputs(lm)
    answers = [r.text for r in lm.generate_until(_simple_requests(docs))]
    assert lm._chunk_images is True
    images = sum(len(im) for im, _ in seen)
    # every image once, and the first batch with images once more (the check against its own call)
    assert images == 15 and sum(calls) == images + len(next(im for im, _ in seen if im))
    assert len(calls) <= 2 + images // plugin.IMAGE_CHUNK and len(calls) < len(seen)
    own = fam.processor.image_processor
    for im, inputs in seen:
        if im:
            want = own([i.convert("RGB") for i in im], return_tensors="pt")["pixel_values"]
            assert torch.equal(inputs["pixel_values"], want)
        else:
            assert "pixel_values" not in inputs
    per_batch = _plugin(fam, PRUNE, batch_size=bs, docs=docs)
    per_batch._chunk_images = False
    _, calls = _record_inputs(per_batch)
    assert [r.text for r in per_batch.generate_until(_simple_requests(docs))] == answers
    assert len(calls) == sum(1 for im, _ in seen if im)


def test_a_processor_whose_rows_depend_on_the_call_gets_one_call_per_batch(demo):
    """Where a chunk's rows differ from a batch's own call (here: pixels shifted by the call's image count), the
    plugin notices at the first chunk and calls the processor per batch, so every batch gets its own call's rows."""
    fam = demo
    docs = _docs(fam, text_only=())
    lm = _plugin(fam, PRUNE, batch_size=2, docs=docs)
    seen, _ = _record_inputs(lm)
    counted = lm.encoder.image_inputs

    def call_dependent(images):
        out = counted(images)
        return dict(out, pixel_values=out["pixel_values"] + len(images))

    lm.encoder.image_inputs = call_dependent
    lm.generate_until(_simple_requests(docs))
    assert lm._chunk_images is False
    own = fam.processor.image_processor
    for im, inputs in seen:
        want = own([i.convert("RGB") for i in im], return_tensors="pt")["pixel_values"] + len(im)
        assert torch.equal(inputs["pixel_values"], want)


def test_the_next_batch_is_prepared_on_a_background_thread(demo):
    """The next batch's conversations (the task's doc_to_visual) and image inputs are built on the prefetch thread
    while a batch generates: batch k + 1's preparation starts before batch k's generate ends, on another thread;
    the time split says so (the prefetch's own keys, not the request loop's); the answers are those of the loop
    preparing each batch itself; and no thread outlives the call."""
    import threading

    fam = demo
    docs = _docs(fam) * 2
    lm = _plugin(fam, PRUNE, batch_size=3, docs=docs)
    events, prepare, generate = [], lm._prepare, fam.model.generate

    def traced_prepare(batches, conversations, ahead, k):
        events.append(("prepare", k, threading.current_thread().name))
        return prepare(batches, conversations, ahead, k)

    def traced_generate(*args, **kwargs):
        events.append(("generate start", None, threading.current_thread().name))
        out = generate(*args, **kwargs)
        events.append(("generate end", None, threading.current_thread().name))
        return out

    lm._prepare = traced_prepare
    with mock.patch.object(fam.model, "generate", traced_generate):  # the patch's own wrapper back after it
        answers = [r.text for r in lm.generate_until(_simple_requests(docs))]
    batches = (len(docs) + 2) // 3
    assert [k for what, k, _ in events if what == "prepare"] == list(range(batches))
    assert all(name.startswith("eos-prefetch") for what, _, name in events if what == "prepare")
    assert all(name == threading.current_thread().name for what, _, name in events if what != "prepare")
    # every preparation after the first is submitted before the previous batch's generate starts
    order = [what if what != "prepare" else f"prepare {k}" for what, k, _ in events]
    for k in range(1, batches):
        ends_before = order[:order.index(f"prepare {k}")].count("generate end")
        assert ends_before <= k - 1, (k, order)
    t = lm.timing
    assert t["prefetch_visuals_s"] > 0 and t["prefetch_preprocess_s"] > 0 and t["visuals_s"] == 0.0
    assert t["preprocess_s"] == 0.0 and 0 < t["prefetch_wait_s"] < t["total_s"]
    assert not [th for th in threading.enumerate() if th.name.startswith("eos-prefetch")]

    inline = _plugin(fam, PRUNE, batch_size=3, docs=docs)

    class Done:  # the preparation run on the request loop's own thread, one batch at a time
        def __init__(self, value):
            self.value = value

        def result(self):
            return self.value

    class Inline:
        def __init__(self, *args, **kwargs):
            pass

        def submit(self, fn, *args):
            return Done(fn(*args))

        def shutdown(self, **kwargs):
            pass

    import concurrent.futures

    with mock.patch.object(concurrent.futures, "ThreadPoolExecutor", Inline):
        assert [r.text for r in inline.generate_until(_simple_requests(docs))] == answers


def test_an_error_while_preparing_a_later_batch_reaches_the_caller(demo):
    """A doc whose doc_to_visual fails, in a batch prepared on the prefetch thread, raises its own error from
    ``generate_until`` (the batches before it answered), and the prefetch thread is gone after it."""
    import threading

    fam = demo
    docs = [dict(d) for d in _docs(fam, text_only=()) * 4]  # 24 docs: batches 0-7 fill the first image chunk
    lm = _plugin(fam, PRUNE, batch_size=2, docs=docs)

    def visual(doc):
        if doc is docs[-1]:  # in a batch after the first image chunk's (the count below)
            raise RuntimeError("doc_to_visual failed on doc 23")
        return [doc["image"]]

    requests = [Instance("generate_until", (d["question"], {"max_new_tokens": 2}, visual, i, "t", "test"), 0,
                         {"task": "t", "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]
    with pytest.raises(RuntimeError, match="doc_to_visual failed on doc 23"):
        lm.generate_until(requests)
    assert lm.timing["batches"] == 8  # the batches of the first chunk answered
    assert not [th for th in threading.enumerate() if th.name.startswith("eos-prefetch")]


def test_other_families_get_one_image_processor_call_per_batch(fam):
    """Dynamic-resolution and tiled families (the processor's outputs hold grids, sizes or tile counts; its rows
    are not one per image) get one image processor call per batch, with no look-ahead; Gemma 3 (fixed count, but
    its processor also gives num_crops) after one look-ahead call at the first chunk. Each batch's image inputs
    are its own call's, bit for bit."""
    if fam.name == "llava":
        pytest.skip("one row per image: test_image_chunks_give_each_batch_its_own_image_inputs")
    docs = _docs(fam)
    lm = _plugin(fam, PRUNE, batch_size=2, docs=docs)
    assert lm._chunk_images is (None if fam.name == "gemma3" else False)
    seen, calls = _record_inputs(lm)
    lm.generate_until(_simple_requests(docs))
    assert lm._chunk_images is False
    per_batch = [len(im) for im, _ in seen if im]
    assert calls == ([sum(per_batch)] if fam.name == "gemma3" else []) + per_batch
    for im, inputs in seen:
        if im:
            want = fam.processor.image_processor([i.convert("RGB") for i in im], return_tensors="pt")
            assert all(torch.equal(inputs[k], want[k]) for k in want if k in inputs) and \
                torch.equal(inputs["pixel_values"], want["pixel_values"]), fam.name


def test_a_batch_of_prompts_gets_each_prompts_own_ids(fam):
    """``PromptEncoder.prompts`` (what ``generate_until`` builds a batch's prompts with) gives each conversation the
    ids of its own ``prompt`` call (image and text-only prompts mixed, both interfaces' turns): through the
    tokenizers-library tokenizer where the transformers one is a plain TokenizersBackend (its first use checked
    against the transformers call), else one transformers call each; the plugin's ``_prompts`` gives them too, and
    ``answers`` (log-likelihood batches) gives each ``answer``'s."""
    from eos_kernels.search.data import _backend_encoder

    docs = _docs(fam, text_only=(1, 5))
    lm = _plugin(fam, docs=docs)
    chat = _plugin(fam, cls=EOSChat, docs=docs)
    convs = [lm._simple_conversation(d["question"], _visual, "t", "test", i) for i, d in enumerate(docs)]
    messages = [[{"role": "user", "content": ([{"type": "image", "url": d["image"]}] if d["image"] else [])
                  + [{"type": "text", "text": d["question"]}]},
                 {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
                 {"role": "user", "content": [{"type": "text", "text": "and?"}]}] for d in docs]
    convs += [chat._chat_conversation(m, "t", "test", i) for i, m in enumerate(messages)]
    want = [lm.encoder.prompt(turns, images) for turns, images in convs]
    renderer = lm.encoder._renderer
    texts = [renderer.text(turns, True) for turns, _ in convs]
    tok = lm.encoder.tokenizer
    real = type(tok).__call__
    calls = []

    def counted(self, text, *args, **kwargs):
        calls.append(text)
        return real(self, text, *args, **kwargs)

    direct = _backend_encoder(tok) is not None
    assert (renderer._backend is not None) == direct
    type(tok).__call__ = counted
    try:
        for first in (True, False):
            calls.clear()
            got = lm.encoder.prompts(convs, [f"doc {i}" for i in range(len(convs))])
            assert got == want, (fam.name, first)
            prompt_calls = [c for c in calls if c in texts]  # not the visual counter's calls
            if direct and not first:
                assert prompt_calls == [], fam.name  # checked at the first use: the tokenizers library's own encode
            else:  # the check at the first use, or the transformers tokenizer: one call per prompt
                assert sorted(prompt_calls) == sorted(texts), fam.name
        # scored conversations (loglikelihood): each one's answer() ids, as a batch
        scored = [(turns + [("gpt", "a b")], images) for turns, images in convs]
        assert lm.encoder.answers(scored) == [lm.encoder.answer(t, im) for t, im in scored], fam.name
    finally:
        type(tok).__call__ = real
    assert renderer._backend_checked is direct and (renderer._backend is not None) == direct
    items = lm._simple_items(_simple_requests(docs))
    assert lm._prompts(items, convs[:len(docs)]) == [(ids, None) for ids in want[:len(docs)]]
    # an error still names its sample
    bad = list(convs[:2]) + [([("human", "no placeholder")], convs[0][1] or convs[2][1])]
    with pytest.raises(ValueError, match="doc 2"):
        lm.encoder.prompts(bad, ["doc 0", "doc 1", "doc 2"])


def test_the_direct_tokenizer_path_falls_back_to_the_transformers_call(demo):
    """A backend whose ids differ from the transformers call at the first use is dropped for good (the call's
    ids are given), and a backend left with padding or truncation is not used (the call clears them)."""
    from eos_kernels.search.data import PromptEncoder

    enc = PromptEncoder(demo.processor, image_token_id=demo.model.config.image_token_id, num_visual_tokens=64)
    renderer = enc._renderer
    assert renderer._backend is not None  # the demo's tokenizer is a plain TokenizersBackend
    texts = ["USER: what is it? ASSISTANT:", "USER: and this? ASSISTANT:"]
    want = [renderer.ids(t) for t in texts]
    backend = renderer._backend

    class Shifted:  # a backend that gives other ids
        padding = truncation = None
        encode_special_tokens = False

        def encode(self, text, add_special_tokens=True):
            return SimpleNamespace(ids=[i + 1 for i in backend.encode(text, add_special_tokens=add_special_tokens).ids])

    renderer._backend = Shifted()
    assert renderer.ids_many(texts) == want and renderer._backend is None and renderer._backend_checked
    assert renderer.ids_many(texts) == want
    fresh = PromptEncoder(demo.processor, image_token_id=demo.model.config.image_token_id, num_visual_tokens=64)
    backend = fresh._renderer._backend
    backend.enable_truncation(max_length=3)
    try:
        assert fresh._renderer.ids_many(texts) == want  # the transformers call: it clears the truncation
        assert backend.truncation is None and not fresh._renderer._backend_checked
        assert fresh._renderer.ids_many(texts) == want and fresh._renderer._backend_checked
    finally:
        backend.no_truncation()


def test_padded_inputs_are_the_row_by_row_padding(demo):
    """``_inputs`` pads left (generation) and right (log-likelihood) as the per-row assignment did: pad id and mask
    0 at the padding, the prompt's ids and mask 1 elsewhere, long tensors."""
    lm = _plugin(demo)
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    for side in ("left", "right"):
        got = lm._inputs(prompts, None, side=side)
        L = 5
        ids = torch.full((4, L), lm.encoder.pad_token_id, dtype=torch.long)
        mask = torch.zeros((4, L), dtype=torch.long)
        for b, p in enumerate(prompts):
            sl = slice(L - len(p), L) if side == "left" else slice(0, len(p))
            ids[b, sl] = torch.tensor(p)
            mask[b, sl] = 1
        assert got["input_ids"].dtype == got["attention_mask"].dtype == torch.long
        assert torch.equal(got["input_ids"], ids) and torch.equal(got["attention_mask"], mask)
        assert "pixel_values" not in got


def test_image_inputs_pass_rgb_images_as_they_are_and_convert_the_others(demo):
    """``image_inputs`` hands an RGB image to the processor without a copy (``convert("RGB")`` gave its copy) and
    still converts every other mode: the outputs are those of converting each image first, for RGB, grey,
    RGBA, palette and RGB-with-a-transparent-colour images."""
    from PIL import Image

    from eos_kernels.search.data import image_inputs

    base = _docs(demo, text_only=())[0]["image"]
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    keyed = base.copy()
    keyed.info["transparency"] = tuple(base.getpixel((0, 0)))
    images = [base, base.convert("L"), rgba, base.convert("P"), keyed]
    want = demo.processor.image_processor([im.convert("RGB") for im in images], return_tensors="pt")
    got = image_inputs(demo.processor, images)
    assert got.keys() == {k for k, v in want.items() if torch.is_tensor(v)}
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert [im.mode for im in images] == ["RGB", "L", "RGBA", "P", "RGB"]  # the callers' images untouched
