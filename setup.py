"""megatron_style: open pretraining for BEiT-3 style Multiway Transformers.

On machines without CUDA install the CPU build of torch first (an unpinned torch pulls several
GB of CUDA packages):   pip install torch==2.13.0 && pip install -e .[dev]
"""
from setuptools import find_packages, setup

setup(
    name="megatron_style",
    version="0.1.0",
    description="Pretraining for BEiT-3 style Multiway Transformers: masked data modeling over "
                "images, texts and image-text pairs with DeepSpeed ZeRO and tensor parallelism",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_style", "megatron_style.*", "kernels", "kernels.*"]),
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "webdataset>=0.2.86",
        "sentencepiece>=0.2",
        "tensorboard>=2.14",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        # Tests: Triton runs the kernels on CPU under TRITON_INTERPRET=1. The torchscale parity
        # tests also need `pip install --no-deps torchscale==0.3.0` (its timm dependency pulls
        # torchvision and a CUDA torch; the tests supply timm's one function they use).
        # Triton 3.6 (the newest torch 2.11 images ship it) compiles every kernel for sm_90; its
        # interpreter cannot take a loop bound loaded from memory under numpy >= 2.4 (fixed in
        # 3.7), so the CPU kernel tests want 3.7 or newer.
        "dev": ["pytest>=8", "pytest-timeout", "triton>=3.7", "fairscale", "matplotlib"],
        "gpu": ["triton>=3.6"],
    },
    entry_points={
        "console_scripts": [
            "beit3-pretrain=megatron_style.train.pretrain:main",
            "beit3-evaluate=megatron_style.cli.evaluate:main",
            "beit3-plot=megatron_style.cli.plot:main",
            "beit3-run-summary=megatron_style.cli.run_summary:main",
            "beit3-export=megatron_style.cli.export:main",
            "beit3-summary=megatron_style.cli.summary:main",
            "beit3-make-shards=megatron_style.cli.make_shards:main",
            "beit3-train-tokenizer=megatron_style.cli.train_tokenizer:main",
            "beit3-convert-tp=megatron_style.cli.convert_tp:main",
            "beit3-memory-plan=megatron_style.cli.memory_plan:main",
            "beit3-kernel-check=megatron_style.cli.kernel_check:main",
        ]
    },
)
