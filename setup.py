"""iar-jax: JAX/Flax implementation of IAR and IAR2 (cluster-oriented AR image generation)."""
from setuptools import find_packages, setup

# One jax pin for the core and the accelerator extras: with jax already installed, pip keeps it
# and adds the CUDA / TPU plugins of exactly that version.
JAX = ">=0.5"

setup(
    name="iar-jax",
    version="0.1.0",
    description="IAR / IAR2 autoregressive image generation in JAX/Flax, TPU-native.",
    packages=find_packages(include=["iar_jax", "iar_jax.*"]),
    package_data={"iar_jax": ["data/embedded/*", "evaluation/*.npz"]},
    python_requires=">=3.10",
    install_requires=[
        "jax" + JAX,
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "chex",
        "ml-collections",
        "clu",
        "grain",
        "tensorflow-datasets",
        # clu's metric writers import tensorflow and tensorboard without declaring them.
        "tensorflow-cpu",
        "tensorboard",
        "absl-py",
        "numpy",
        "scipy",
        "pillow",
        "tqdm",
        "matplotlib",
        "scikit-learn",
        "scikit-image",
        "pytest",
    ],
    extras_require={
        # Only for reading/writing PyTorch checkpoints; never on the core path.
        "torch": ["torch==2.13.0"],
        # Accelerators: pip install -e ".[cuda12]" (NVIDIA GPUs) or ".[tpu]" (Cloud TPU VMs; libtpu also
        # lets any host compile TPU programs, benchmarks/tpu_aot.py).
        "cuda12": ["jax[cuda12]" + JAX],
        "tpu": ["jax[tpu]" + JAX],
    },
    entry_points={"console_scripts": ["iar-jax=iar_jax.cli:main"]},
)
