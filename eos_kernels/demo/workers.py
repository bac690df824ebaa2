"""The demo's jobs -- searches, tuning scores, held-out evaluations -- run in worker processes or in this one.

A :class:`Jobs` holds what every job needs (the model, its processor, the two
splits) once per process. With ``workers > 1`` the jobs run in that many
spawned processes of one torch thread each (the built-in model is tiny: two
single-threaded processes do more on two cores than one process with two
threads); with ``workers == 1`` they run here, on the model already loaded (a
``--model`` checkpoint on a GPU). Every job is deterministic given its inputs,
so where it ran does not change its result beyond float rounding of the thread
count.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = ["Setup", "Jobs"]


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a process needs to rebuild the jobs' state (picklable)."""

    model: str | None          # checkpoint folder, None: the built-in demo model
    device: str
    dtype: str
    search_json: str
    eval_json: str
    image_folder: str | None
    impl: str


# the per-process state of a worker (built by _init, read by the job functions)
_STATE: dict[str, Any] = {}


def _load(setup: Setup, model=None, processor=None) -> dict:
    from eos_kernels.integrations.auto import adapter_for
    from eos_kernels.search.data import load_dataset

    if model is None:
        if setup.model is None:
            from eos_kernels.demo import build

            model, processor = build.load_demo_model()
        else:
            from eos_kernels.search.model_loading import load_model, resolve_device, resolve_dtype

            device = resolve_device(setup.device)
            model, processor = load_model(setup.model, device, resolve_dtype(setup.dtype, device))
        model.eval()
    adapter = adapter_for(model)
    fixed = adapter.visual_tokens_per_image(model)

    def split(path):
        return load_dataset(path, processor, num_visual_tokens=fixed, image_token_id=model.config.image_token_id,
                            image_folder=setup.image_folder)

    return {"setup": setup, "model": model, "processor": processor, "adapter": adapter,
            "search": split(setup.search_json), "held": split(setup.eval_json), "scoring": {}}


def _init(setup: Setup) -> None:
    torch.set_num_threads(1)
    _STATE.clear()
    _STATE.update(_load(setup))


# ------------------------------------------------------------------------------------------- the jobs
def _search(config: dict) -> dict:
    """One search (:func:`eos_kernels.search.run`) on the process's model; its Θ as a dict."""
    from eos_kernels.search import SearchConfig, run

    from eos_kernels.demo.report import parameter_table

    st = _STATE
    result = run(SearchConfig.from_dict(config), model=st["model"], processor=st["processor"])
    return {"theta": result.theta.to_dict(), "log": result.log_path, "plots": list(result.plots),
            "steps": result.step, "step_time": _median_step_time(result.log_path),
            "parameters": parameter_table(result.log_path, result.space, result.theta)}


def _median_step_time(log_path: str) -> float | None:
    import json
    import statistics

    with open(log_path, encoding="utf-8") as f:
        times = [json.loads(line).get("step_time") for line in f if line.strip()]
    times = [t for t in times if t is not None]
    return statistics.median(times) if times else None


def _tune(thetas: Sequence[dict], indices: Sequence[int], batch_size: int) -> list[float]:
    """Exact-match accuracy of each Θ on the search split's questions ``indices`` (one teacher-forced forward)."""
    from eos_kernels.search.scoring import ScoringBatches, exact_match_accuracy
    from eos_kernels.theta import Theta

    st = _STATE
    key = (tuple(indices), batch_size)
    if key not in st["scoring"]:
        param = next(st["model"].parameters())
        st["scoring"][key] = ScoringBatches(st["search"], indices, batch_size, param.device, param.dtype)
    batches = st["scoring"][key]
    return [exact_match_accuracy(st["model"], batches, Theta.from_dict(t), st["adapter"]) for t in thetas]


def _evaluate(theta: dict, batch_size: int, max_new_tokens: int) -> dict:
    """``evaluate``'s greedy accuracy and token report of one Θ on the held-out split."""
    from eos_kernels.search import SearchConfig, evaluate
    from eos_kernels.theta import Theta

    st = _STATE
    setup = st["setup"]
    cfg = SearchConfig(data=setup.eval_json, image_folder=setup.image_folder, max_new_tokens=max_new_tokens,
                       batch_size=batch_size, impl=setup.impl)
    out = evaluate(cfg, [Theta.from_dict(theta)], model=st["model"], processor=st["processor"],
                   dataset=st["held"], write=False, answer_ce=False)
    return out["results"][0]


# ------------------------------------------------------------------------------------------- the runner
class Jobs:
    """Runs the demo's jobs in ``workers`` processes (spawned), or here when ``workers == 1``."""

    def __init__(self, setup: Setup, workers: int, model=None, processor=None):
        self.setup = setup
        self.workers = workers
        self.pool = None
        if workers > 1:
            ctx = multiprocessing.get_context("spawn")
            self.pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                                               initializer=_init, initargs=(setup,))
        if self.pool is None or model is not None:  # this process's state now, on the model it was given
            _STATE.clear()
            _STATE.update(_load(setup, model, processor))

    @property
    def state(self) -> dict:
        """This process's model, processor, adapter and splits (loaded here even when workers run the jobs)."""
        if not _STATE:
            _STATE.update(_load(self.setup))
        return _STATE

    def map(self, fn: Callable, calls: Iterable[tuple], progress: Callable[[Any], None] | None = None) -> list:
        """``[fn(*args) for args in calls]``, in the workers when there are some; results in call order."""
        calls = list(calls)
        if self.pool is None:
            out = []
            for args in calls:
                out.append(fn(*args))
                if progress is not None:
                    progress(out[-1])
            return out
        futures = {self.pool.submit(fn, *args): i for i, args in enumerate(calls)}
        results: list = [None] * len(calls)
        for fut in concurrent.futures.as_completed(futures):
            results[futures[fut]] = fut.result()
            if progress is not None:
                progress(results[futures[fut]])
        return results

    def search(self, configs: Sequence[dict], progress=None) -> list[dict]:
        return self.map(_search, [(c,) for c in configs], progress)

    def tune(self, thetas: Sequence[dict], indices: Sequence[int], batch_size: int, chunk: int = 8,
             progress=None) -> list[float]:
        chunks = [list(thetas[s:s + chunk]) for s in range(0, len(thetas), chunk)]
        scores = self.map(_tune, [(c, list(indices), batch_size) for c in chunks], progress)
        return [a for part in scores for a in part]

    def evaluate(self, thetas: Sequence[dict], batch_size: int, max_new_tokens: int, progress=None) -> list[dict]:
        return self.map(_evaluate, [(t, batch_size, max_new_tokens) for t in thetas], progress)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def cpu_workers() -> int:
    """Two workers where there are two cores or more, else one."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1
