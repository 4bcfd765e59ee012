"""Datasets as in-memory ``TensorDataset`` objects: digits, MNIST, Fashion-MNIST, CIFAR-10 and
Tiny-ImageNet-style image folders.

Nothing is downloaded at run time. A missing dataset raises ``FileNotFoundError`` whose message
says how to get it. Images come back as float32 ``N x C x H x W`` tensors normalized with fixed
per-dataset constants (``NORMALIZATION``), labels as int64.

Splits: ``"train"`` and ``"test"`` are the official parts; ``"val"`` is a deterministic held-out
part of the official training set (``val_fraction`` of it, chosen by ``seed``), and ``"train"`` is
the rest. digits has no official split: a permutation with a fixed seed (independent of ``seed``)
puts 20% into test, and the remaining images are split into train/val the same way.

Decoded uint8 arrays are cached in memory per (dataset, root, part), so repeated loads only pay
for the float conversion.
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "DATASETS",
    "NORMALIZATION",
    "SPLITS",
    "clear_cache",
    "input_shape",
    "load",
    "loader",
    "num_classes",
]

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "imagefolder")
SPLITS = ("train", "val", "test")

# Per-channel (mean, std) of the [0, 1]-scaled pixels. digits: computed over all 1797 images of
# sklearn's load_digits after /16. mnist, fashion-mnist, cifar10: over the official training set
# (the widely published values; fashion-mnist recomputed from the Debian package's files).
# imagefolder: the ImageNet constants, the usual choice for Tiny ImageNet.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3053,), (0.3760,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"

# The digits test set must not move when a user changes `seed` (that only re-draws train/val), so
# it comes from its own fixed seed.
_DIGITS_TEST_SEED = 0
_DIGITS_TEST_FRACTION = 0.2

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

# Used by num_classes / input_shape when no imagefolder root is given (Tiny ImageNet).
_STATIC_INFO = {
    "digits": (10, (1, 8, 8)),
    "mnist": (10, (1, 28, 28)),
    "fashion-mnist": (10, (1, 28, 28)),
    "cifar10": (10, (3, 32, 32)),
    "imagefolder": (200, (3, 64, 64)),
}

# (name, resolved root, official part) -> (uint8 images N x C x H x W, int64 labels[, classes]).
_cache: dict[tuple[str, str, str], tuple] = {}


def clear_cache() -> None:
    """Drop every decoded dataset held in memory."""
    _cache.clear()


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def load(
    name: str,
    split: str,
    root: str | os.PathLike | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> TensorDataset:
    """Load one split of a dataset as a ``TensorDataset(images float32 NCHW, labels int64)``.

    ``name`` is one of ``DATASETS`` and ``split`` one of ``SPLITS``. ``root`` is the dataset folder
    (ignored for digits; defaults to the Debian package folder for fashion-mnist, required for the
    others). ``val_fraction`` of the official training set (of the non-test 80% for digits),
    drawn with ``seed``, forms "val" and the rest "train"; "test" never depends on either.
    """
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")

    if name == "digits":
        images, labels = _digits()
        test_idx, pool_idx = _split_indices(len(labels), _DIGITS_TEST_FRACTION, _DIGITS_TEST_SEED)
        if split == "test":
            return _to_dataset(name, images[test_idx], labels[test_idx])
        images, labels = images[pool_idx], labels[pool_idx]
    else:
        part = "test" if split == "test" else "train"
        images, labels = _official_part(name, root, part)[:2]
        if split == "test":
            return _to_dataset(name, images, labels)

    val_idx, train_idx = _split_indices(len(labels), val_fraction, seed)
    idx = val_idx if split == "val" else train_idx
    return _to_dataset(name, images[idx], labels[idx])


def loader(
    name: str,
    split: str,
    batch_size: int,
    *,
    root: str | os.PathLike | None = None,
    shuffle: bool | None = None,
    seed: int = 0,
    num_workers: int = 0,
    val_fraction: float = 0.1,
) -> DataLoader:
    """A ``DataLoader`` over ``load(name, split, root)``; shuffles the train split by default.

    The shuffle order comes from a generator seeded with ``seed``, so a fresh loader built with the
    same arguments yields the same batches in the same order.
    """
    dataset = load(name, split, root, val_fraction=val_fraction, seed=seed)
    if shuffle is None:
        shuffle = split == "train"
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
    )


def num_classes(name: str, *, root: str | os.PathLike | None = None) -> int:
    """Number of classes; for ``imagefolder`` it is read from ``root`` if given, else 200."""
    _check_name(name)
    if name == "imagefolder" and root is not None:
        return len(_official_part(name, root, "train")[2])
    return _STATIC_INFO[name][0]


def input_shape(name: str, *, root: str | os.PathLike | None = None) -> tuple[int, int, int]:
    """Shape ``(C, H, W)`` of one image; for ``imagefolder`` read from ``root`` if given."""
    _check_name(name)
    if name == "imagefolder" and root is not None:
        return tuple(_official_part(name, root, "train")[0].shape[1:])
    return _STATIC_INFO[name][1]


# ----------------------------------------------------------------------------------------------
# Helpers shared by all datasets
# ----------------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")


def _freeze(entry: tuple) -> tuple:
    """Mark cached arrays read-only so no caller can corrupt later loads."""
    for item in entry:
        if isinstance(item, np.ndarray):
            item.flags.writeable = False
    return entry


def _split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministically cut ``range(n)`` into (held-out, rest); both sorted."""
    held = int(round(fraction * n))
    perm = np.random.default_rng(seed).permutation(n)
    # Sorting keeps the original order inside each part, so a split is a plain subset.
    return np.sort(perm[:held]), np.sort(perm[held:])


def _to_dataset(name: str, images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    """uint8 (or [0, 1] float) NCHW images -> normalized float32 tensors."""
    # astype copies, so the cached (read-only) arrays are never aliased by the returned tensors.
    x = torch.from_numpy(images.astype(np.float32))
    if images.dtype == np.uint8:
        x.div_(255.0)
    mean, std = NORMALIZATION[name]
    x.sub_(torch.tensor(mean).view(1, -1, 1, 1)).div_(torch.tensor(std).view(1, -1, 1, 1))
    y = torch.from_numpy(labels.astype(np.int64))
    ds = TensorDataset(x, y)
    ds.name = name  # lets fit() pick the dataset's default learning rate
    return ds


def _official_part(name: str, root: str | os.PathLike | None, part: str) -> tuple:
    """Decoded (images, labels[, classes]) of an official part, cached per (name, root, part)."""
    root_path = _resolve_root(name, root)
    key = (name, str(root_path), part)
    if key not in _cache:
        decode: Callable[[Path, str], tuple] = {
            "mnist": lambda r, p: _idx_part(r, p, "mnist"),
            "fashion-mnist": lambda r, p: _idx_part(r, p, "fashion-mnist"),
            "cifar10": _cifar_part,
            "imagefolder": _imagefolder_part,
        }[name]
        _cache[key] = _freeze(decode(root_path, part))
    return _cache[key]


def _resolve_root(name: str, root: str | os.PathLike | None) -> Path:
    if root is None:
        if name == "fashion-mnist":
            root = FASHION_MNIST_ROOT
        else:
            raise FileNotFoundError(
                f"{name} has no default location: pass root=...\n" + _how_to_get(name, None)
            )
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{name}: directory {path} does not exist.\n" + _how_to_get(name, path)
        )
    return path


def _how_to_get(name: str, root: Path | None) -> str:
    where = str(root) if root is not None else "<root>"
    idx_names = ", ".join(f + ".gz" for pair in _IDX_FILES.values() for f in pair)
    if name == "fashion-mnist":
        return (
            "Install it with `apt-get install dataset-fashion-mnist` (files land in "
            f"{FASHION_MNIST_ROOT}), or download the Fashion-MNIST IDX files ({idx_names}; gzipped "
            "or not) from https://github.com/zalandoresearch/fashion-mnist into "
            f"{where} and pass root={where!r}."
        )
    if name == "mnist":
        return (
            f"Download the MNIST IDX files ({idx_names}; gzipped or not) into {where} "
            "(from http://yann.lecun.com/exdb/mnist/ or a mirror) and pass root=<that directory>."
        )
    if name == "cifar10":
        return (
            "Download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it with "
            f"`tar -xzf cifar-10-python.tar.gz -C {where}`, so that {where}/cifar-10-batches-py "
            "holds data_batch_1 .. data_batch_5 and test_batch; pass that root (or the "
            "cifar-10-batches-py folder itself)."
        )
    if name == "imagefolder":
        return (
            f"Point root at a folder laid out as {where}/train/<class>/images/*.JPEG or "
            f"{where}/train/<class>/*.png|jpg, and {where}/val/ with val_annotations.txt "
            "(or class folders). For Tiny ImageNet download "
            "http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it; root is then "
            "the tiny-imagenet-200 folder."
        )
    return "Install scikit-learn (`pip install scikit-learn`); the digits data ships with it."


# ----------------------------------------------------------------------------------------------
# digits (scikit-learn)
# ----------------------------------------------------------------------------------------------


def _digits() -> tuple[np.ndarray, np.ndarray]:
    key = ("digits", "", "all")
    if key not in _cache:
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
            raise FileNotFoundError(
                "digits: scikit-learn is missing. " + _how_to_get("digits", None)
            ) from e
        bunch = load_digits()
        # Pixel values are 0..16; scale to [0, 1] here so _to_dataset only normalizes.
        images = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
        _cache[key] = _freeze((images, bunch.target.astype(np.int64)))
    return _cache[key]


# ----------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX)
# ----------------------------------------------------------------------------------------------


def _find_file(root: Path, stem: str) -> Path | None:
    for candidate in (root / (stem + ".gz"), root / stem):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (magic 0x0000 0x08 ndim, big-endian int32 dims, uint8 payload)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a cut .gz an EOFError
        what = "a truncated or damaged gzip file" if path.suffix == ".gz" else "unreadable"
        raise ValueError(f"{path}: {what} ({e}); download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(dims)) if dims else 1
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header says {dims} ({expected} bytes) but holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_part(root: Path, part: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    image_stem, label_stem = _IDX_FILES[part]
    image_file, label_file = _find_file(root, image_stem), _find_file(root, label_stem)
    if image_file is None or label_file is None:
        missing = [
            s + "[.gz]"
            for s, f in ((image_stem, image_file), (label_stem, label_file))
            if f is None
        ]
        raise FileNotFoundError(
            f"{name}: {', '.join(missing)} not found in {root}.\n" + _how_to_get(name, root)
        )
    images, labels = _read_idx(image_file), _read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{name}: {image_file.name} has shape {images.shape} and {label_file.name} "
            f"{labels.shape}; expected N x H x W images and N labels"
        )
    if len(labels) and int(labels.max()) >= 10:
        raise ValueError(
            f"{name}: {label_file.name} holds label {int(labels.max())}; {name} labels are 0 to 9"
        )
    return images[:, None, :, :], labels.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# CIFAR-10 (python pickle batches)
# ----------------------------------------------------------------------------------------------


def _cifar_part(root: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    names = _CIFAR_TRAIN if part == "train" else _CIFAR_TEST
    folder = root
    if not (root / names[0]).is_file() and (root / "cifar-10-batches-py").is_dir():
        folder = root / "cifar-10-batches-py"
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"cifar10: {', '.join(missing)} not found in {folder}.\n" + _how_to_get("cifar10", root)
        )
    images, labels = [], []
    for n in names:
        # The official batches are pickles; only load them from a source you trust.
        with open(folder / n, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = batch.get(b"data", batch.get("data"))
        target = batch.get(b"labels", batch.get("labels"))
        if data is None or target is None:
            raise ValueError(f"cifar10: {folder / n} has no data/labels entries")
        data = np.asarray(data, dtype=np.uint8)
        images.append(data.reshape(len(data), 3, 32, 32))
        labels.append(np.asarray(target, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


# ----------------------------------------------------------------------------------------------
# Image folders (Tiny ImageNet layout)
# ----------------------------------------------------------------------------------------------


def _image_files(folder: Path) -> list[Path]:
    """Images directly in ``folder`` or in ``folder/images`` (Tiny ImageNet), sorted."""
    files = []
    for d in (folder, folder / "images"):
        if d.is_dir():
            files += [
                p for p in d.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS
            ]
    return sorted(files)


def _decode_images(files: list[Path], where: Path) -> np.ndarray:
    from PIL import Image

    arrays = []
    for p in files:
        with Image.open(p) as im:
            # Tiny ImageNet mixes a few grayscale JPEGs in with RGB ones; one channel count for all.
            arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(
            f"imagefolder: images under {where} differ in size ({sorted(shapes)}); "
            "resize them first"
        )
    return np.stack(arrays).transpose(0, 3, 1, 2).copy()


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    return {d.name: _image_files(d) for d in sorted(folder.iterdir()) if d.is_dir()}


def _imagefolder_part(root: Path, part: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(
            f"imagefolder: {train_dir} does not exist.\n" + _how_to_get("imagefolder", root)
        )
    train = {c: f for c, f in _class_folders(train_dir).items() if f}
    if not train:
        raise FileNotFoundError(
            f"imagefolder: no images under {train_dir}.\n" + _how_to_get("imagefolder", root)
        )
    classes = tuple(sorted(train))
    index = {c: i for i, c in enumerate(classes)}

    if part == "train":
        files = [p for c in classes for p in train[c]]
        labels = [index[c] for c in classes for _ in train[c]]
        where = train_dir
    else:
        # Tiny ImageNet's test labels are not public, so its labelled val/ folder is our test set;
        # a test/ folder with class subfolders is used only when there is no val/.
        where = root / "val" if (root / "val").is_dir() else root / "test"
        files, names = _labelled_eval_files(where, root)
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise ValueError(
                f"imagefolder: classes {unknown[:5]} in {where} are not in {train_dir}"
            )
        labels = [index[n] for n in names]
    return _decode_images(files, where), np.asarray(labels, dtype=np.int64), classes


def _labelled_eval_files(where: Path, root: Path) -> tuple[list[Path], list[str]]:
    if not where.is_dir():
        raise FileNotFoundError(
            f"imagefolder: neither {root / 'val'} nor {root / 'test'} exists.\n"
            + _how_to_get("imagefolder", root)
        )
    annotations = where / "val_annotations.txt"
    if annotations.is_file():
        files, names = [], []
        image_dir = where / "images" if (where / "images").is_dir() else where
        for line in annotations.read_text().splitlines():
            fields = line.split("\t") if "\t" in line else line.split()
            if len(fields) >= 2:
                files.append(image_dir / fields[0])
                names.append(fields[1])
        return files, names
    folders = {c: f for c, f in _class_folders(where).items() if f}
    if not folders:
        raise FileNotFoundError(
            f"imagefolder: {where} has neither val_annotations.txt nor class folders with images.\n"
            + _how_to_get("imagefolder", root)
        )
    return [p for c in folders for p in folders[c]], [c for c in folders for _ in folders[c]]
