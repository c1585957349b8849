from setuptools import setup

setup(
    name="reglue",
    version="0.1.0",
    description="Fast, scalable trainer for REGLUE-style latent diffusion (SiT + vision-foundation semantics)",
    python_requires=">=3.10",
    packages=[
        "reglue",
        "reglue.models",
        "reglue.diffusion",
        "reglue.data",
        "reglue.evaluation",
        "reglue.train",
        "reglue.kernels",
    ],
    package_dir={"reglue.kernels": "kernels"},
    py_modules=[],
    install_requires=[
        "torch>=2.6",
        "torchvision",
        "timm",
        "diffusers",
        "safetensors",
        "numpy",
        "pillow",
        "tqdm",
        "torch-fidelity",
        "matplotlib",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "flash": ["flash-attn"],
        "xformers": ["xformers"],
        "dev": ["pytest", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["reglue=reglue.cli:main"]},
)
