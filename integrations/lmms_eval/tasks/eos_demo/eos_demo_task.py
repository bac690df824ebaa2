"""The ``eos_demo`` lmms-eval task: the demo's held-out split, generated in memory (see ``eos_demo.yaml``).

The docs are the records ``eos_kernels.demo.task.generate_split(dir, "eval", images, seed)`` writes, in
order (doc i is record i: same scene, same pixels, same question), so ``--limit N`` scores the first N
records, as ``eos-search --eval --eval-limit N`` does on that file. Scoring is ``eos-search --eval``'s:
exact match after :func:`eos_kernels.search.evaluate.normalize_answer`. The budget metrics are the ones
the ``eos`` plugin recorded for each doc (:mod:`eos_kernels.integrations.lmms_eval.budget`); a model that
records none gets the accuracy alone.
"""
from __future__ import annotations

from lmms_eval.api.task import ConfigurableTask

from eos_kernels.integrations.lmms_eval.budget import sample_budget

TASK = "eos_demo"


def build_docs(images: int = 500, seed: int = 0) -> list[dict]:
    """The split's docs: ``index`` (= lmms-eval's doc_id), ``id``, ``image`` (PIL), ``question``, ``answer``,
    ``question_type`` -- record by record what ``generate_split(..., "eval", images, seed)`` writes."""
    from eos_kernels.demo import task

    stream = task.iter_examples("eval", seed, 1)
    docs = []
    for i in range(int(images)):
        ex = next(stream)
        question, answer, qtype, _ = ex["qa"][0]
        docs.append({"index": i, "id": f"eval-{i:06d}-q0", "image": ex["image"], "question": question,
                     "answer": answer, "question_type": qtype})
    return docs


class EOSDemoTask(ConfigurableTask):
    """A ConfigurableTask whose data come from :func:`build_docs` instead of a download."""

    def __init__(self, *args, config=None, **kwargs):
        if config is not None:
            config = {k: v for k, v in dict(config).items() if k != "class"}
        super().__init__(*args, config=config, **kwargs)

    def download(self, dataset_kwargs=None) -> None:
        import datasets

        meta = dict(self.config.metadata or {})
        features = datasets.Features({"index": datasets.Value("int64"), "id": datasets.Value("string"),
                                      "image": datasets.Image(), "question": datasets.Value("string"),
                                      "answer": datasets.Value("string"), "question_type": datasets.Value("string")})
        split = datasets.Dataset.from_list(build_docs(meta.get("images", 500), meta.get("seed", 0)), features=features)
        self.dataset = datasets.DatasetDict({self.config.test_split: split})
        self.dataset_no_image = datasets.DatasetDict({self.config.test_split: split.remove_columns("image")})


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_target(doc):
    return doc["answer"]


def process_results(doc, results):
    from eos_kernels.search.evaluate import normalize_answer

    out = {"exact_match": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}
    budget = sample_budget(TASK, doc["index"])
    if budget is not None:
        out.update({k: budget[k] for k in ("final_visual_tokens", "mean_leaving_visual_tokens",
                                           "mean_processed_visual_tokens", "prefill_ms")})
        if budget["prefill_flops"] is not None:
            out["prefill_flops_ratio"] = [budget["prefill_flops"], budget["prefill_flops_full"]]
    return out


def ratio_of_sums(items) -> float:
    """Estimated prefill FLOPs of the task against the unreduced model: sum over samples / sum unreduced."""
    full = sum(f for _, f in items)
    return sum(r for r, _ in items) / full if full else float("nan")
