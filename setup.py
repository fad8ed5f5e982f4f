from setuptools import find_packages, setup

setup(
    name="vtok-fast",
    version="0.1.0",
    description="Triton kernels for the visual-token pipeline of vision transformers and VLMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[*find_packages(include=["vtok_fast", "vtok_fast.*"]), "vtok_fast.bench"],
    package_dir={"vtok_fast.bench": "bench"},
    package_data={"vtok_fast": ["data/*.png", "data/*.md", "data/quality_llava/*", "data/quality_qwen2_vl/*"]},
    install_requires=["torch>=2.4", "triton>=3.0", "numpy"],
    extras_require={
        "test": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "timm>=1.0",
            "transformers>=4.45",
            "pillow",
            "faiss-cpu",
            "vector-quantize-pytorch",
            "pytorch-msssim",
            "scikit-image",
            "torchmetrics",
        ],
        "viz": ["pillow"],
    },
    entry_points={"console_scripts": ["vtok-fast=vtok_fast.cli:main"]},
)
