"""Packaging for eos_kernels.

``integrations/`` is installed as ``eos_kernels.integrations`` so that no generic
top-level name lands in site-packages.
"""
from setuptools import setup

setup(
    name="eos_kernels",
    version="0.1.0",
    description="Efficient Operator Search (EOS) for vision-language models: "
    "fused Triton kernels for the unified token-reduction operator",
    python_requires=">=3.10",
    packages=[
        "eos_kernels",
        "eos_kernels.patching",
        "eos_kernels.triton",
        "eos_kernels.integrations",
        "eos_kernels.integrations.lmms_eval",
        "eos_kernels.search",
        "eos_kernels.demo",
    ],
    package_dir={
        "eos_kernels": "eos_kernels",
        "eos_kernels.integrations": "integrations",
    },
    # the demo model's checkpoint (safetensors, config, tokenizer, processor), a few MB
    package_data={"eos_kernels.demo": ["checkpoint/*"],
                  # lmms-eval tasks shipped with the plugin (--include_path)
                  "eos_kernels.integrations.lmms_eval": ["tasks/*/*.yaml", "tasks/*/*.py"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.6",
        "numpy>=1.24",
    ],
    extras_require={
        "hf": ["transformers>=5.0,<6.0"],
        # the search driver (eos-search): data, progress, configs, plots
        "search": ["transformers>=5.0,<6.0", "tqdm>=4.60", "pyyaml>=6", "matplotlib>=3.5", "pillow>=9"],
        "flash": ["flash-attn>=2.6"],
        # the lmms-eval plugin (--model eos): what lmms-eval 0.7.3's evaluator and the plugin import on a
        # CPU-only machine (measured). lmms-eval itself is installed with --no-deps (README): its declared
        # torchvision is a CUDA build that breaks `import transformers` beside a CPU torch, which an extra
        # cannot exclude; filelock 4.3 removed filelock._api, which the evaluator uses
        "eval": ["transformers>=5.0,<6.0", "tqdm>=4.60", "pyyaml>=6", "pillow>=9", "accelerate", "evaluate",
                 "datasets", "sacrebleu", "loguru", "tenacity", "pytz", "pytablewriter", "filelock<4.3"],
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "pytest-xdist>=3",  # the README's `pytest tests -q -n 2`
            "hypothesis>=6.100",
            "transformers>=5.0,<6.0",
            "tqdm>=4.60",
            "pyyaml>=6",
            "matplotlib>=3.5",
            "pillow>=9",
        ],
    },
    entry_points={
        "console_scripts": [
            "eos-search=eos_kernels.search.cli:main",
        ],
        # lmms-eval's model plugins: `lmms-eval --model eos ...`
        "lmms_eval.models": [
            "eos=eos_kernels.integrations.lmms_eval:manifests",
        ],
    },
)
