"""Packaging for vtprune.

`patches/`, `cuda/` and `eval/` live at the top of the repository (the design
card's layout) and are installed as `vtprune.patches`, `vtprune.cuda` and
`vtprune.eval`, so a user only ever imports `vtprune`. `model_zoo.yaml` is
copied into the installed package.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent


class BuildWithZoo(build_py):
    """Copy the top-level model_zoo.yaml into the built `vtprune` package."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "vtprune" / "model_zoo.yaml"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(HERE / "model_zoo.yaml", target)


setup(
    name="vtprune",
    version="0.1.0",
    description="Visual-token pruning for HuggingFace multimodal LLMs",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["vtprune"]
    + [f"vtprune.{p.parent.name}" for p in sorted((HERE / "vtprune").glob("*/__init__.py"))]
    + ["vtprune.patches", "vtprune.cuda", "vtprune.eval", "vtprune.eval.tasks"],
    package_dir={
        "vtprune": "vtprune",
        "vtprune.patches": "patches",
        "vtprune.cuda": "cuda",
        "vtprune.eval": "eval",
    },
    package_data={
        "vtprune.toyvqa": ["checkpoints/*/*"],
        "vtprune.cuda": ["*.cu"],
        "vtprune.eval": ["*.yaml", "configs/*.yaml"],
        "vtprune.eval.tasks": ["*/*"],
    },
    cmdclass={"build_py": BuildWithZoo},
    install_requires=[
        # The tested range: CI runs CPU torch 2.13.0 (leg 1) and torch 2.14.1 (leg 2);
        # transformers itself needs >= 2.6. No upper bound: torch does not move the
        # model files vtprune hooks, and a range 2.13.0 satisfies keeps pip from
        # replacing an installed torch.
        "torch>=2.13",
        # The tested range: CI runs 5.24.0 (constraints.txt) and 5.25.0, the newest
        # release. vtprune hooks transformers' model files, which minor releases
        # change (5.25 changed the hybrid cache's lengths and the mask builders), so
        # a release no CI has run cannot be installed beside vtprune by accident.
        # Raise the bound once the suite passes on the next release.
        "transformers>=5.24,<5.26",
        "safetensors",
        "tokenizers",
        "pyyaml",
        "numpy",
        "pillow",
    ],
    extras_require={
        "demo": ["scikit-image", "matplotlib"],
        "test": ["pytest", "scikit-image", "matplotlib", "ruff", "mypy", "ray"],  # ray: the sweep's --backend ray test
        # lmms-eval itself is installed separately with --no-deps (README): its own
        # requirements would replace the installed torch. These are what its evaluator,
        # its HF model wrappers and its common tasks import (decord: wheels for x86-64
        # Linux only). filelock<4.3: lmms-eval 0.7.3 imports filelock._api, gone in 4.3.
        "eval": [
            "loguru",
            "sacrebleu",
            "evaluate",
            "pytz",
            "tenacity",
            "pytablewriter",
            "accelerate",
            "decord",
            "matplotlib",
            "tqdm",
            "filelock<4.3",
            "einops",
            "ftfy",
            "httpx",
            "jsonlines",
            "nltk",
            "numexpr",
            "openpyxl",
            "protobuf",
            "python-dotenv",
            "sentencepiece",
            "tiktoken",
            "zss",
            "zstandard",
            "pybind11",
            "tqdm-multiprocess",
            "scikit-learn",
        ],
        # lmms-eval's Qwen wrappers: qwen-vl-utils, which imports torchvision. torchvision
        # is not listed: an unpinned torchvision makes pip replace the installed torch
        # with the one the newest torchvision needs. Install the torchvision release that
        # pairs with your torch yourself (README: "Evaluation"; `vtprune doctor` checks it).
        "eval-qwen": ["qwen-vl-utils"],
        "flash": ["flash-attn"],
        "ray": ["ray"],  # vtprune sweep --backend ray
    },
    entry_points={
        "console_scripts": ["vtprune=vtprune.cli:main"],
        "lmms_eval.models": ["vtprune=vtprune.eval.lmms_plugin:manifest"],  # lmms-eval --model vtprune
    },
)
