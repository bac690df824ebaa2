"""Video inputs of the lmms-eval plugin ``eos`` on tiny random models of every family whose model takes videos.

Needs torchvision (transformers 5.x builds the video processors of Qwen2-VL, Qwen2.5-VL, Qwen3-VL and
LLaVA-OneVision only with it) and PyAV (writes the test videos, and is one of the plugin's decoders), so
**in CI (a CPU torch, which no torchvision release imports beside) the whole module is skipped**; run it
in a venv where torchvision imports (the README's "Benchmarks with lmms-eval" says how it was run:
torch 2.14.1 + torchvision 0.29.1, transformers 5.25.0, PyAV, torchcodec with the system's FFmpeg).
What CI checks instead: a video request without torchvision is an ``ImportError`` naming it
(``tests/test_lmms_eval.py``).

Videos are short synthetic mp4 files written here (different lengths, sizes and frame rates, so the
families' video token counts differ); lmms-eval hands them to the plugin as paths, as its video tasks do.
- the plugin's prompt ids and inputs for a video request (simple and chat interfaces, a video alone and
  beside an image, ``num_frames`` and ``fps`` sampling, torchcodec and PyAV decoding; the test videos
  decode to the same pixels with both) equal the stock processor's for the same request:
  ``processor.apply_chat_template(messages, tokenize=True, ...)`` on the video's path, which decodes with
  torchcodec (skipped without it), and the frames' timestamps / indices equal the video processor's;
- ``theta=none`` answers are the unpatched model's greedy answers on those stock inputs;
- batch 4 = batch 1 with videos, images and a text-only prompt in one batch, under a pruning Θ that
  reduces the video tokens, and each sample's budget is ``Theta.token_report`` at its own counts (video
  tokens counted as visual tokens);
- log-likelihood with videos: batch 4 = batch 1, and at ``theta=none`` the stock model's answer log-prob;
- a checkpoint folder with its full processor runs through ``EOS(pretrained=...)``;
- clear errors: a family whose model takes no video, both ``num_frames`` and ``fps``, an unusable decoder.
"""
import contextlib
import os
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("lmms_eval")
pytest.importorskip(
    "torchvision", exc_type=ImportError,
    reason="the video processors of Qwen2(.5)-VL, Qwen3-VL and LLaVA-OneVision need torchvision in transformers "
           "5.x, which no release imports beside CI's CPU torch; tests/test_lmms_eval.py checks the error instead")
pytest.importorskip("av", reason="PyAV writes the test videos (pip install av)")

import transformers  # noqa: E402
from packaging.version import Version  # noqa: E402

from eos_kernels.integrations.lmms_eval.video import MIN_TRANSFORMERS  # noqa: E402

if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
    pytest.skip(f"the plugin refuses videos on transformers < {MIN_TRANSFORMERS} (an ImportError naming the "
                "release)", allow_module_level=True)

sys.path.insert(0, os.path.dirname(__file__))

from lmms_eval.api.instance import Instance  # noqa: E402

from eos_kernels.integrations.lmms_eval.model import EOS, EOSChat  # noqa: E402
from eos_kernels.integrations.lmms_eval.video import Video  # noqa: E402
from eos_kernels.theta import Theta  # noqa: E402

import _tiny_families as tf  # noqa: E402
import _tiny_qwen3_vl as q3  # noqa: E402
from _tiny_models import write_ragged_llava_dataset  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ("qwen2", "qwen2.5", "qwen3", "qwen3_moe", "llava_onevision")
PRUNE = "fastv-1-0.5"
NUM_FRAMES = 4
#: (frames, width, height, fps) of the test videos
VIDEOS = {"a.mp4": (20, 40, 32, 8), "b.mp4": (13, 48, 24, 10), "c.mp4": (9, 32, 40, 6)}


def _torchcodec():
    from eos_kernels.integrations.lmms_eval.video import _available_backends

    return "torchcodec" in _available_backends()


def _write_video(path, frames, width, height, fps, seed):
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.zeros((height, width, 3), np.uint8)
            img[..., 0] = (np.arange(width)[None] * 6 + i * 11) % 256
            img[..., 1] = (np.arange(height)[:, None] * 7 + i * 5) % 256
            img[..., 2] = rng.integers(0, 256, (height, width))
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    import json

    from PIL import Image

    root = tmp_path_factory.mktemp("video_media")
    videos = {}
    for k, (name, spec) in enumerate(VIDEOS.items()):
        _write_video(root / name, *spec, seed=k)
        videos[name] = str(root / name)
    data = write_ragged_llava_dataset(root / "data")
    records = json.load(open(data))
    images = []
    for rec in records:
        with Image.open(os.path.join(os.path.dirname(data), rec["image"])) as im:
            images.append(im.convert("RGB"))
    questions = [rec["conversations"][0]["value"].replace("<image>\n", "") for rec in records]
    answers = [rec["conversations"][1]["value"] for rec in records]
    return SimpleNamespace(videos=videos, images=images, questions=questions, answers=answers)


def _build(name):
    if name in ("qwen2", "qwen2.5"):
        version = name[len("qwen"):]
        return tf.tiny_qwen(version), tf.tiny_qwen_processor(version)
    if name.startswith("qwen3"):
        return q3.tiny_qwen3(moe=name == "qwen3_moe"), q3.tiny_qwen3_processor()
    return tf.tiny_llava_onevision(), tf.tiny_onevision_processor()


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
    model, processor = _build(request.param)
    return SimpleNamespace(name=request.param, model=model.eval(), processor=processor)


def _docs(media):
    """Video alone, video + image, image alone, text only, another video, video then image."""
    v, im, q = media.videos, media.images, media.questions
    visuals = [[v["a.mp4"]], [im[0], v["b.mp4"]], [im[1]], [], [v["c.mp4"]], [v["b.mp4"], im[2]]]
    return [{"visuals": vis, "question": q[i], "answer": media.answers[i]} for i, vis in enumerate(visuals)]


def _doc_visuals(doc):
    return doc["visuals"]


def _requests(docs, gen=None):
    gen = {"max_new_tokens": 4, "until": ["\n\n"]} if gen is None else gen
    return [Instance("generate_until", (d["question"], dict(gen), _doc_visuals, i, "t", "test"), 0,
                     {"task": "t", "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]


def _plugin(fam, docs, theta="none", cls=EOS, batch_size=1, **video):
    video.setdefault("num_frames", NUM_FRAMES)
    if "fps" in video:
        video.pop("num_frames")
    lm = cls.from_model(fam.model, fam.processor, theta, batch_size=batch_size, name=fam.name, **video)
    lm.task_dict = {"t": {"test": docs}}
    return lm


def _messages(doc, answer=None):
    content = [{"type": "video", "path": v} if isinstance(v, str) else {"type": "image", "image": v}
               for v in doc["visuals"]] + [{"type": "text", "text": doc["question"]}]
    msgs = [{"role": "user", "content": content}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def _stock(fam, doc, answer=None, **sampling):
    """The stock processor's inputs for ``doc``: apply_chat_template on the video paths (torchcodec decodes)."""
    sampling = sampling or {"num_frames": NUM_FRAMES, "fps": None}
    return fam.processor.apply_chat_template(_messages(doc, answer), tokenize=True, return_dict=True,
                                             add_generation_prompt=answer is None,
                                             processor_kwargs=dict(sampling, return_tensors="pt"))


@contextlib.contextmanager
def _replacements(processor):
    """The strings ``processor`` writes for each video inside the block (its ``replace_video_token``, wrapped on
    this instance only)."""
    wrote, inner = [], getattr(processor, "replace_video_token", None)
    if inner is None:  # releases before 5.9 expand videos inside __call__: the ids alone are compared
        yield None
        return

    def record(*args, **kwargs):
        wrote.append(inner(*args, **kwargs))
        return wrote[-1]

    processor.replace_video_token = record
    try:
        yield wrote
    finally:
        del processor.replace_video_token


def _visual_count(fam, ids):
    cfg = fam.model.config
    return int(sum((torch.as_tensor(ids) == t).sum() for t in (cfg.image_token_id, cfg.video_token_id)))


# --------------------------------------------------------------------------- the processor's prompts and inputs
@pytest.mark.skipif(not _torchcodec(), reason="the stock processor decodes a video path with torchcodec only "
                                              "(transformers 5.x); install torchcodec and FFmpeg")
@pytest.mark.parametrize("backend", ["auto", "pyav"])  # auto: torchcodec, the processor's own decoder
@pytest.mark.parametrize("sampling", [{"num_frames": NUM_FRAMES}, {"fps": 3}], ids=["num_frames", "fps"])
def test_video_prompts_and_inputs_are_the_stock_processors(fam, media, sampling, backend):
    docs = _docs(media)
    lm = _plugin(fam, docs, video_backend=backend, **sampling)
    chat = _plugin(fam, docs, cls=EOSChat, video_backend=backend, **sampling)
    stock_sampling = dict(sampling, **({"fps": None} if "num_frames" in sampling else {}))
    for i in (0, 1, 4, 5):
        doc = docs[i]
        want = _stock(fam, doc, **stock_sampling)
        turns, visuals = lm._simple_conversation(doc["question"], _doc_visuals, "t", "test", i)
        messages = [{"role": "user", "content": [
            {"type": "video", "url": v} if isinstance(v, str) else {"type": "image", "url": v}
            for v in doc["visuals"]] + [{"type": "text", "text": doc["question"]}]}]
        chat_turns, chat_visuals = chat._chat_conversation(messages, "t", "test", i)
        assert chat_visuals == visuals and chat_turns == turns, (fam.name, i)
        with _replacements(fam.processor) as wrote:
            ids, video = lm._prompt(turns, visuals, "t")
        with _replacements(fam.processor) as stock_wrote:
            _stock(fam, doc, **stock_sampling)
        # the text the processor wrote for each video (Qwen3-VL: its "<t seconds>" timestamps, which the tiny
        # word tokenizer cannot tell apart in the ids)
        assert wrote == stock_wrote and (wrote is None or len(wrote) == sum(isinstance(v, str) for v in doc["visuals"]))
        assert ids == want["input_ids"][0].tolist(), (fam.name, i)
        images = [v for v in visuals if not isinstance(v, Video)]
        inputs = lm._inputs([ids], lm._image_inputs(images) if images else None, videos=[video])
        names = set(want) - {"attention_mask"}
        assert names <= set(inputs) | {"image_sizes", "batch_num_images"}, (names, set(inputs))
        for k in names & set(inputs):
            assert torch.equal(inputs[k], want[k].to(inputs[k].dtype)), (fam.name, i, k)
        assert "pixel_values_videos" in inputs and lm.video.backend == ("torchcodec" if backend == "auto" else backend)
        # the sampled frames and their timestamps: the video processor's own
        for path in (v for v in doc["visuals"] if isinstance(v, str)):
            _, meta = lm.video.load(Video(path), "t")
            ref = fam.processor.video_processor(videos=[path], do_sample_frames=True, return_metadata=True,
                                                **stock_sampling)["video_metadata"][0]
            assert list(meta.frames_indices) == list(ref.frames_indices) and meta.fps == ref.fps


@pytest.mark.skipif(not _torchcodec(), reason="the stock reference decodes with torchcodec (install it and FFmpeg)")
def test_theta_none_answers_are_the_stock_models_on_the_processors_inputs(fam, media):
    from eos_kernels.patching import unpatch_model

    docs = _docs(media)
    lm = _plugin(fam, docs, "none", batch_size=3)
    got = [r.text for r in lm.generate_until(_requests(docs))]
    assert all(r["final_visual_tokens"] == r["visual_tokens"] for r in lm.records)
    unpatch_model(fam.model)
    tok = lm.encoder.tokenizer
    want = []
    for doc in docs:
        inputs = _stock(fam, doc)
        with torch.no_grad():
            out = fam.model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=tok.eos_token_id,
                                     pad_token_id=lm.encoder.pad_token_id)
        gen = out[0, inputs["input_ids"].shape[1]:].tolist()
        gen = gen[:gen.index(tok.eos_token_id)] if tok.eos_token_id in gen else gen
        want.append(tok.decode(gen, skip_special_tokens=True).split("\n\n")[0])
    assert got == want, fam.name


@pytest.mark.skipif(not _torchcodec(), reason="the stock reference decodes with torchcodec (install it and FFmpeg)")
def test_a_video_shorter_than_num_frames_keeps_all_its_frames(fam, media):
    """The default 32 frames of a 13-frame video: all 13, in whole temporal patches (Qwen: 12), as the stock
    processor samples that many; OneVision's videos of different lengths cannot share a batch (a clear error)."""
    docs = _docs(media)
    lm = EOS.from_model(fam.model, fam.processor, "none", batch_size=2)
    lm.task_dict = {"t": {"test": docs}}
    step = getattr(fam.processor.video_processor, "temporal_patch_size", None) or 1
    kept = VIDEOS["b.mp4"][0] // step * step
    _, meta = lm.video.load(Video(media.videos["b.mp4"]), "t")
    assert len(meta.frames_indices) == kept
    doc = {"visuals": [media.videos["b.mp4"]], "question": docs[0]["question"]}
    lm.task_dict = {"t": {"test": [doc, {"visuals": [media.videos["c.mp4"]], "question": "q"}]}}
    turns, visuals = lm._simple_conversation(doc["question"], _doc_visuals, "t", "test", 0)
    assert lm._prompt(turns, visuals, "t")[0] == _stock(fam, doc, num_frames=kept, fps=None)["input_ids"][0].tolist()
    if fam.name == "llava_onevision":  # 13 and 9 frames
        with pytest.raises(ValueError, match="cannot be stacked"):
            lm.generate_until(_requests(lm.task_dict["t"]["test"]))


# --------------------------------------------------------------------------- batching and the budget
def test_batch_four_equals_batch_one_with_videos_and_the_budget_counts_them(fam, media):
    docs = _docs(media)
    answers, records = {}, {}
    for bs in (1, 4):
        lm = _plugin(fam, docs, PRUNE, batch_size=bs)
        out = lm.generate_until(_requests(docs))
        answers[bs] = [r.text for r in out]
        records[bs] = {r["doc_id"]: r for r in lm.records}
        assert lm.timing["batches"] == (len(docs) + bs - 1) // bs
    assert answers[4] == answers[1], fam.name
    from eos_kernels.integrations.auto import adapter_for

    theta = Theta.fastv(1, 0.5)
    hidden, ffn = adapter_for(fam.model).text_sizes(fam.model)  # MoE: the active experts' width
    for i, r in records[1].items():
        assert {k: v for k, v in records[4][i].items() if k != "prefill_ms"} == \
            {k: v for k, v in r.items() if k != "prefill_ms"}, (fam.name, i)
        turns, visuals = lm._simple_conversation(docs[i]["question"], _doc_visuals, "t", "test", i)
        ids, _ = lm._prompt(turns, visuals, "t")
        assert r["visual_tokens"] == _visual_count(fam, ids) and r["input_tokens"] == len(ids)
        if not docs[i]["visuals"]:
            assert (r["visual_tokens"], r["final_visual_tokens"], r["prefill_flops_ratio"]) == (0, 0, 1.0)
            continue
        want = theta.token_report(r["visual_tokens"], lm.num_layers, r["text_tokens"], hidden_size=hidden,
                                  intermediate_size=ffn)
        assert (r["final_visual_tokens"], r["mean_leaving_visual_tokens"], r["mean_processed_visual_tokens"],
                r["prefill_flops"], r["prefill_flops_full"]) == \
            (want["final"], want["mean_leaving"], want["mean_processed"], want["prefill_flops"],
             want["prefill_flops_full"]), (fam.name, i)
        assert r["final_visual_tokens"] < r["visual_tokens"]  # the Θ reduced the video tokens too
    if _torchcodec():  # the video tokens the stock processor writes for the video alone
        assert records[1][0]["visual_tokens"] == _visual_count(fam, _stock(fam, docs[0])["input_ids"][0])


def test_loglikelihood_with_videos(fam, media):
    docs = _docs(media)
    reqs = [Instance("loglikelihood", (d["question"], d["answer"], _doc_visuals, i, "t", "test"), 0,
                     {"task": "t", "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]
    lls = {}
    for bs in (1, 4):
        lls[bs] = _plugin(fam, docs, PRUNE, batch_size=bs).loglikelihood(reqs)
    for (ll1, g1), (ll4, g4) in zip(lls[1], lls[4]):
        assert ll4 == pytest.approx(ll1, rel=1e-5, abs=1e-4) and g1 == g4
    if not _torchcodec():
        return
    from eos_kernels.patching import unpatch_model

    lm = _plugin(fam, docs, "none")
    got = lm.loglikelihood(reqs)
    unpatch_model(fam.model)
    for (ll, _), doc in zip(got, docs):
        prompt = _stock(fam, doc)["input_ids"].shape[1]
        full = _stock(fam, doc, answer=doc["answer"])
        n = full["input_ids"].shape[1]
        with torch.no_grad():
            logits = fam.model(**full).logits.float()
        # the answer's tokens as the plugin labels them: the whole assistant turn (its end-of-turn tokens too)
        logp = torch.log_softmax(logits[0, prompt - 1:n - 1], dim=-1)
        target = full["input_ids"][0, prompt:]
        assert ll == pytest.approx(float(logp.gather(-1, target[:, None]).sum()), rel=1e-5, abs=1e-4), fam.name


# --------------------------------------------------------------------------- a checkpoint folder, errors
def test_a_checkpoint_folder_with_its_full_processor_takes_videos(tmp_path, media):
    from eos_kernels.search.data import TokenizerAndImageProcessor

    folder = tf.save_tiny_qwen(str(tmp_path / "qwen"), version="2.5")
    lm = EOS(pretrained=folder, theta=PRUNE, device="cpu", dtype="float32", num_frames=NUM_FRAMES,
             video_backend="pyav", batch_size=2)
    assert not isinstance(lm.processor, TokenizerAndImageProcessor)
    docs = _docs(media)
    lm.task_dict = {"t": {"test": docs}}
    out = lm.generate_until(_requests(docs))
    assert len(out) == len(docs) and all(r.token_counts.to_dict()["visual_tokens"] > 0 for r in out[:3])
    assert lm.video.backend == "pyav"


def test_video_errors_are_clear(media, tmp_path):
    from eos_kernels.demo.build import checkpoint_path
    from eos_kernels.search.model_loading import load_model

    docs = _docs(media)
    model, processor = load_model(checkpoint_path(), torch.device("cpu"), torch.float32)  # LLaVA-1.5: no video
    llava = EOS.from_model(model.eval(), processor, "none")
    llava.task_dict = {"t": {"test": docs}}
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration takes no video inputs"):
        llava.generate_until(_requests(docs[:1]))
    with pytest.raises(ValueError, match="mutually exclusive"):
        EOS.from_model(model, processor, "none", num_frames=8, fps=2)
    with pytest.raises(ValueError, match="video_backend='ffmpeg' is not one of"):
        EOS.from_model(model, processor, "none", video_backend="ffmpeg")
    with pytest.raises(ValueError, match="num_frames must be an integer >= 1"):
        EOS.from_model(model, processor, "none", num_frames=0)
    internvl = EOS.from_model(tf.tiny_internvl(), tf.tiny_internvl_processor(), "none")
    internvl.task_dict = {"t": {"test": docs}}
    with pytest.raises(ValueError, match="InternVLForConditionalGeneration takes no video inputs"):
        internvl.generate_until(_requests(docs[:1]))
    qwen, qproc = _build("qwen2.5")
    lm = EOS.from_model(qwen, qproc, "none", video_backend="decord")
    lm.task_dict = {"t": {"test": docs}}
    from transformers.utils import is_decord_available

    if not is_decord_available():
        with pytest.raises(ImportError, match="video_backend='decord' is not usable here"):
            lm.generate_until(_requests(docs[:1]))
    lm = EOS.from_model(qwen, qproc, "none")
    lm.task_dict = {"t": {"test": [{"visuals": [str(tmp_path / "missing.mp4")], "question": "q"}]}}
    with pytest.raises(ValueError, match="is not a file"):
        lm.generate_until(_requests(lm.task_dict["t"]["test"]))
    lm.task_dict = {"t": {"test": [{"visuals": [media.videos["a.mp4"]], "question": "<video> <video> q"}]}}
    with pytest.raises(ValueError, match="holds 2 <video> for 1 video"):
        lm.generate_until(_requests(lm.task_dict["t"]["test"]))


# --------------------------------------------------------------------------- lmms-eval's command line
_TASK_YAML = """task: eos_video_test
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function eos_video_test.doc_to_visual
doc_to_text: !function eos_video_test.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_TASK_PY = '''def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
'''


def test_lmms_eval_cli_runs_a_video_task(tmp_path, media):
    """lmms-eval end to end on a local video task (its docs hold video paths, as lmms-eval's video tasks do):
    the chat class gets lmms-eval's own ``{"type": "video", "url": path}`` messages; batch 2 = batch 1, and the
    budget in the results counts the video tokens."""
    import glob
    import json
    import shutil
    import subprocess

    import yaml

    from eos_kernels.integrations.lmms_eval.budget import budget_from_results

    exe = shutil.which("lmms-eval", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("lmms-eval's command line is not installed")
    folder = tf.save_tiny_qwen(str(tmp_path / "qwen"), version="2.5")
    docs = [{"video": media.videos[name], "question": q, "answer": "red"}
            for name, q in zip(("a.mp4", "b.mp4", "c.mp4", "a.mp4"), media.questions)]
    with open(tmp_path / "docs.json", "w") as f:
        json.dump(docs, f)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "eos_video_test.yaml").write_text(_TASK_YAML.format(data=tmp_path / "docs.json"))
    (tasks / "eos_video_test.py").write_text(_TASK_PY)
    runs = [{"model": "eos", "model_args": f"pretrained={folder},theta={PRUNE},num_frames={NUM_FRAMES}",
             "tasks": "eos_video_test", "include_path": str(tasks), "batch_size": bs, "log_samples": True,
             "output_path": str(tmp_path / f"out-b{bs}")} for bs in (1, 2)]
    with open(tmp_path / "runs.yaml", "w") as f:
        yaml.safe_dump(runs, f)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([exe, "--config", str(tmp_path / "runs.yaml"), "--verbosity", "DEBUG"], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=600)
    out = {}
    for bs in (1, 2):
        files = glob.glob(str(tmp_path / f"out-b{bs}" / "*" / "*_results.json"))
        assert len(files) == 1, (proc.stdout + proc.stderr)[-4000:]
        samples = glob.glob(str(tmp_path / f"out-b{bs}" / "*" / "*_samples_eos_video_test.jsonl"))
        rows = sorted((json.loads(line) for line in open(samples[0])), key=lambda r: r["doc_id"])
        out[bs] = (budget_from_results(files[0])["eos_video_test"], rows)
    assert [r["filtered_resps"] for r in out[2][1]] == [r["filtered_resps"] for r in out[1][1]]
    budget, rows = out[1]
    assert budget["samples"] == len(docs)
    # the video tokens of each doc, as the plugin counts them in-process (itself checked against the processor)
    model, processor = _build("qwen2.5")
    lm = _plugin(SimpleNamespace(name="qwen2.5", model=model, processor=processor),
                 [{"visuals": [d["video"]], "question": d["question"]} for d in docs])
    counts = []
    for i, d in enumerate(docs):
        turns, visuals = lm._simple_conversation(d["question"], _doc_visuals, "t", "test", i)
        counts.append(_visual_count(SimpleNamespace(model=model), lm._prompt(turns, visuals, "t")[0]))
    assert budget["visual_tokens"] == pytest.approx(sum(counts) / len(counts))
    assert 0 < budget["final_visual_tokens"] < budget["visual_tokens"]
