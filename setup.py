"""mae_jax: masked autoencoders for 6-channel high-content-screening microscopy, in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="mae_jax",
    version="0.1.0",
    description="JAX/Flax MAEs for HCS microscopy and genome-wide maps of biology "
                "(Kraus et al., arXiv 2309.16064).",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["mae_jax", "mae_jax.*", "data_prep", "data_prep.*", "configs",
                                    "eval", "eval.*"]),
    package_data={"mae_jax.data": ["*.tsv.gz"]},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",
        "numpy>=2.0",
        # Every command imports ml_dtypes through jax: 0.7.0 takes ~1 s of CPU to import, 0.6.0
        # ~0.15 s (measured, 2 CPU cores). jax <= 0.10.2, all Python 3.11 gets, needs >= 0.5.
        "ml_dtypes>=0.5.1,<0.7; python_version < '3.12'",
        "ml-collections>=1.1.0",
        "einops>=0.8",
        "absl-py>=2.1",
        "google-crc32c>=1.6",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
        "pillow>=10.0",
        "tifffile>=2024.1.1",
        "pandas>=2.1",
        "pyarrow>=15",
        "scipy>=1.11",
        "portpicker>=1.6",
        "safetensors>=0.4",  # mae_jax.weights: official PyTorch weights in and out (numpy only)
        "plotly>=6.0",  # eval.explore: the map page (plotly.js inlined)
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "selenium>=4.20"],
        # eval.explore lays the map out with UMAP when it is installed (else PCA).
        "explore": ["umap-learn>=0.5"],
        "tpu": ["jax[tpu]"],
        # TPU compiler for `python -m mae_jax.compile` on machines without a TPU: the libtpu that
        # jax 0.10.2's [tpu] extra pins.
        "aot": ["libtpu==0.0.42.*"],
        "cuda12": ["jax[cuda12]"],
        # TensorFlow CPU, only to cross-read our TFRecord shards with tf.data in a test.
        "interop": ["tensorflow-cpu>=2.21"],
        # CellProfiler features for the study's hand-crafted arm (mae_jax/demo/cellprofiler.py).
        "cellprofiler": ["cp_measure>=0.3"],
        # data_prep.convert --runner=...: the conversion as an Apache Beam pipeline. 2.71 is the
        # newest that coexists with cp_measure's pillow<12 (2.72+ need pillow>=12.1.1); it brings
        # protobuf 6.33, pyarrow 18 and grpcio 1.65 (docs/data_layouts.md §5).
        "beam": ["apache-beam>=2.71"],
        # eval.recall's mean average precision (eval/map_metrics.py: copairs);
        # tests/test_profiles.py checks eval/normalize.py against pycytominer.
        "profiling": ["copairs>=0.5", "pycytominer>=1.2"],
    },
)
