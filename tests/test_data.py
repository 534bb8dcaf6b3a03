"""swa_research.data: CIFAR and image folders on disk, splits, batches and augmentation."""

from __future__ import annotations

import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms

import swa_research.data.folders as data_mod
from swa_research.config import DataConfig, UserError
from swa_research.data import (
    ImageSet,
    Preprocess,
    eval_batches,
    load_datasets,
    split_train_val,
    synthetic_images,
    train_batches,
)
from swa_research.data.transforms import image_seeds

CPU = torch.device("cpu")

# --------------------------------------------------------------------------------------------
# CIFAR in its on-disk format


def _rows(rng: np.random.Generator, n: int) -> np.ndarray:
    # One row per image: 1024 red, 1024 green, 1024 blue values, row-major 32x32.
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _dump(obj: object, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root: Path) -> tuple[np.ndarray, list[int], np.ndarray, list[int], list[str]]:
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    train_rows, train_labels = [], []
    for k in range(1, 6):
        n = 3 + k  # batches of different sizes, 25 images in all
        rows = _rows(rng, n)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        _dump({"batch_label": f"training batch {k} of 5", "labels": labels, "data": rows,
               "filenames": [f"img_{k}_{i}.png" for i in range(n)]},
              folder / f"data_batch_{k}")
        train_rows.append(rows)
        train_labels += labels
    test_rows = _rows(rng, 6)
    test_labels = [int(v) for v in rng.integers(0, 10, size=6)]
    _dump({"batch_label": "testing batch 1 of 1", "labels": test_labels, "data": test_rows,
           "filenames": [f"test_{i}.png" for i in range(6)]}, folder / "test_batch")
    _dump({"num_cases_per_batch": 10000, "label_names": names, "num_vis": 3072},
          folder / "batches.meta")
    return np.concatenate(train_rows), train_labels, test_rows, test_labels, names


def write_cifar100(root: Path) -> tuple[np.ndarray, list[int], np.ndarray, list[int], list[str]]:
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine = [f"fine{i:02d}" for i in range(100)]
    out = []
    for split, n in (("train", 12), ("test", 5)):
        rows = _rows(rng, n)
        labels = [int(v) for v in rng.integers(0, 100, size=n)]
        _dump({"filenames": [f"{split}_{i}.png" for i in range(n)], "batch_label": split,
               "fine_labels": labels, "coarse_labels": [v // 5 for v in labels], "data": rows},
              folder / split)
        out += [rows, labels]
    _dump({"fine_label_names": fine, "coarse_label_names": [f"c{i}" for i in range(20)]},
          folder / "meta")
    return out[0], out[1], out[2], out[3], fine


@pytest.fixture
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """The files are ours, not the published ones: skip only torchvision's md5 comparison."""
    for cls in (torchvision.datasets.CIFAR10, torchvision.datasets.CIFAR100):
        monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    # batches.meta / meta are checked by the module-level helper: keep its existence check.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity",
                        lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_matches_torchvision(tmp_path: Path, no_md5: None, name: str) -> None:
    writer = write_cifar10 if name == "cifar10" else write_cifar100
    tv_cls = torchvision.datasets.CIFAR10 if name == "cifar10" else \
        torchvision.datasets.CIFAR100
    train_rows, train_labels, test_rows, test_labels, names = writer(tmp_path)
    train, test, classes = load_datasets(DataConfig(name=name, root=str(tmp_path),
                                                    download=False))
    assert classes == names
    assert not list(tmp_path.rglob("*.lock"))  # the data set's lock does not stay behind
    for ours, rows, labels, is_train in ((train, train_rows, train_labels, True),
                                         (test, test_rows, test_labels, False)):
        assert ours.images.dtype == torch.uint8 and ours.labels.dtype == torch.int64
        assert ours.images.shape == (len(rows), 3, 32, 32)
        assert ours.images.is_contiguous()
        assert ours.labels.tolist() == labels
        # The raw rows are planar RGB: reshaping gives CHW directly.
        assert torch.equal(ours.images, torch.from_numpy(rows.reshape(-1, 3, 32, 32)))
        ref = tv_cls(str(tmp_path), train=is_train, download=False,
                     transform=transforms.PILToTensor())
        assert len(ref) == len(ours)
        for i in range(len(ref)):
            img, y = ref[i]
            assert torch.equal(ours.images[i], img), i
            assert int(ours.labels[i]) == y


def test_cifar_missing_folder(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(UserError) as err:
        load_datasets(DataConfig(name="cifar10", root=str(root), download=False))
    msg = str(err.value)
    assert str(root / "cifar-10-batches-py") in msg
    assert "data.root" in msg
    assert "download=false" in msg
    with pytest.raises(UserError, match="cifar-100-python"):
        load_datasets(DataConfig(name="cifar100", root=str(root), download=False))


# --------------------------------------------------------------------------------------------
# Image folders


def rgb(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def flat(color: tuple[int, int, int], size: int = 32) -> np.ndarray:
    return np.broadcast_to(np.array(color, dtype=np.uint8), (size, size, 3)).copy()


CLASSES = ["dog", "airplane", "cat"]  # loaded in sorted order: airplane, cat, dog
TEST_COLORS = {"airplane": (200, 30, 40), "cat": (20, 180, 90), "dog": (60, 70, 220)}


def write_folder(root: Path) -> dict[str, np.ndarray]:
    """train/<class>/{0,1}.png (random pixels), test/<class>/0.jpg (flat colour)."""
    pixels = {}
    for c_i, cls in enumerate(CLASSES):
        d = root / "train" / cls
        d.mkdir(parents=True)
        for k in range(2):
            arr = rgb(10 * c_i + k)
            Image.fromarray(arr).save(d / f"{k}.png", compress_level=0)
            pixels[f"train/{cls}/{k}.png"] = arr
        (d / "notes.txt").write_text("not an image")
        t = root / "test" / cls
        t.mkdir(parents=True)
        arr = flat(TEST_COLORS[cls])
        Image.fromarray(arr).save(t / "0.jpg", quality=95)
        pixels[f"test/{cls}/0.jpg"] = arr
    (root / "train" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    return pixels


def folder_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(name="imagefolder", root=str(root), **kw)


def test_imagefolder_load(tmp_path: Path) -> None:
    pixels = write_folder(tmp_path)
    train, test, classes = load_datasets(folder_cfg(tmp_path))
    assert classes == ["airplane", "cat", "dog"]
    assert train.images.shape == (6, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (3, 3, 32, 32) and test.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert test.labels.tolist() == [0, 1, 2]
    for i, cls in enumerate(["airplane", "airplane", "cat", "cat", "dog", "dog"]):
        expected = torch.from_numpy(pixels[f"train/{cls}/{i % 2}.png"]).permute(2, 0, 1)
        assert torch.equal(train.images[i], expected)  # PNG is lossless: exact
    for i, cls in enumerate(classes):
        expected = torch.tensor(TEST_COLORS[cls], dtype=torch.int16).view(3, 1, 1)
        assert (test.images[i].to(torch.int16) - expected).abs().max() <= 3  # JPEG


def test_imagefolder_cache_written_and_used(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    write_folder(tmp_path)
    train, test, _ = load_datasets(folder_cfg(tmp_path))
    cache = tmp_path / ".swa_cache"
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2
    assert files[0].startswith("test-") and files[1].startswith("train-")
    assert all(f.endswith(".pt") for f in files)

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(data_mod, "_decode", no_decode)
    train2, test2, classes = load_datasets(folder_cfg(tmp_path))
    assert classes == ["airplane", "cat", "dog"]
    assert torch.equal(train2.images, train.images) and torch.equal(train2.labels, train.labels)
    assert torch.equal(test2.images, test.images) and torch.equal(test2.labels, test.labels)


def test_imagefolder_cache_invalidated_by_a_changed_file(tmp_path: Path) -> None:
    write_folder(tmp_path)
    load_datasets(folder_cfg(tmp_path))
    # Different content and a different file size.
    new = flat((1, 2, 3))
    Image.fromarray(new).save(tmp_path / "train" / "cat" / "1.png")
    train, _, _ = load_datasets(folder_cfg(tmp_path))
    assert torch.equal(train.images[3], torch.from_numpy(new).permute(2, 0, 1))
    # Same size (uncompressed PNG), later modification time.
    path = tmp_path / "train" / "dog" / "0.png"
    size, mtime = path.stat().st_size, path.stat().st_mtime_ns
    new = rgb(12345)
    Image.fromarray(new).save(path, compress_level=0)
    os.utime(path, ns=(mtime + 2 * 10**9, mtime + 2 * 10**9))
    assert path.stat().st_size == size
    train, _, _ = load_datasets(folder_cfg(tmp_path))
    assert torch.equal(train.images[4], torch.from_numpy(new).permute(2, 0, 1))


def test_imagefolder_new_file_invalidates_cache(tmp_path: Path) -> None:
    write_folder(tmp_path)
    load_datasets(folder_cfg(tmp_path))
    Image.fromarray(rgb(77)).save(tmp_path / "train" / "airplane" / "2.png")
    train, _, _ = load_datasets(folder_cfg(tmp_path))
    assert len(train) == 7
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert torch.equal(train.images[2], torch.from_numpy(rgb(77)).permute(2, 0, 1))


def test_imagefolder_damaged_cache_is_rebuilt(tmp_path: Path) -> None:
    write_folder(tmp_path)
    first, _, _ = load_datasets(folder_cfg(tmp_path))
    for p in (tmp_path / ".swa_cache").iterdir():
        p.write_bytes(b"garbage")
    again, _, _ = load_datasets(folder_cfg(tmp_path))
    assert torch.equal(again.images, first.images)
    blob = torch.load(next((tmp_path / ".swa_cache").glob("train-*.pt")), weights_only=True)
    assert torch.equal(blob["images"], first.images)


def test_imagefolder_on_read_only_storage_caches_in_the_user_cache_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    write_folder(root)
    # A file where the cache folder would go: root/.swa_cache cannot be written, as on
    # read-only storage (which a test running as root cannot simulate with permissions).
    (root / ".swa_cache").write_text("")
    monkeypatch.delenv("SWA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    train, test, _ = load_datasets(folder_cfg(root))
    fallback = data_mod.cache_dirs(root)[1]
    assert fallback.parent == tmp_path / "xdg" / "swa_research"
    assert fallback.name.startswith("data-")
    assert sorted(p.name.split("-")[0] for p in fallback.iterdir()) == ["test", "train"]

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded although the fallback cache is valid")

    monkeypatch.setattr(data_mod, "_decode", no_decode)
    train2, test2, _ = load_datasets(folder_cfg(root))
    assert torch.equal(train2.images, train.images) and torch.equal(test2.labels, test.labels)
    # $SWA_CACHE_DIR, where set, comes before the XDG folder.
    monkeypatch.setenv("SWA_CACHE_DIR", str(tmp_path / "mine"))
    assert data_mod.cache_dirs(root)[1].parent == tmp_path / "mine"


def test_imagefolder_loads_without_any_writable_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "data"
    write_folder(root)
    (root / ".swa_cache").write_text("")
    (tmp_path / "blocked").write_text("")
    monkeypatch.setenv("SWA_CACHE_DIR", str(tmp_path / "blocked"))
    with caplog.at_level("WARNING", logger="swa_research.data"):
        train, test, _ = load_datasets(folder_cfg(root))
    assert len(train) == 6 and len(test) == 3
    assert "could not write the decode cache" in caplog.text
    assert str(root / ".swa_cache") in caplog.text and str(tmp_path / "blocked") in caplog.text


def test_imagefolder_cache_off(tmp_path: Path) -> None:
    write_folder(tmp_path)
    train, _, _ = load_datasets(folder_cfg(tmp_path, cache=False))
    assert len(train) == 6
    assert not (tmp_path / ".swa_cache").exists()


def test_imagefolder_resize(tmp_path: Path) -> None:
    write_folder(tmp_path)
    full, _, _ = load_datasets(folder_cfg(tmp_path))  # caches the 32x32 decode
    assert full.images.shape[-1] == 32
    train, test, _ = load_datasets(folder_cfg(tmp_path, image_size=16))
    assert train.images.shape == (6, 3, 16, 16) and test.images.shape == (3, 3, 16, 16)
    # A flat image stays flat when resized.
    assert (test.images[0].to(torch.int16) - torch.tensor([200, 30, 40]).view(3, 1, 1)
            ).abs().max() <= 3


def test_imagefolder_other_formats(tmp_path: Path) -> None:
    # Extensions the loader lists must also decode: GIF, BMP, TIFF and PPM files.
    write_folder(tmp_path)
    extra = {}
    for k, ext in enumerate(["bmp", "tif", "ppm", "gif"]):
        arr = rgb(500 + k) // 64 * 64  # few colours, so that GIF's palette keeps them exactly
        Image.fromarray(arr).save(tmp_path / "train" / "dog" / f"x{k}.{ext}")
        extra[ext] = arr
    train, _, _ = load_datasets(folder_cfg(tmp_path))
    assert len(train) == 10
    for k, ext in enumerate(["bmp", "tif", "ppm", "gif"]):
        expected = torch.from_numpy(extra[ext]).permute(2, 0, 1)
        assert torch.equal(train.images[6 + k], expected), ext


def test_imagefolder_errors(tmp_path: Path) -> None:
    # root missing
    with pytest.raises(UserError, match="does not exist"):
        load_datasets(folder_cfg(tmp_path / "absent"))
    # train/ missing
    (tmp_path / "a" / "test" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="no train/ folder"):
        load_datasets(folder_cfg(tmp_path / "a"))
    # train/ without images (empty, then only a non-image file)
    (tmp_path / "a" / "train").mkdir()
    with pytest.raises(UserError, match="no images found") as err:
        load_datasets(folder_cfg(tmp_path / "a"))
    assert str(tmp_path / "a" / "train") in str(err.value)
    (tmp_path / "a" / "train" / "cat").mkdir()
    (tmp_path / "a" / "train" / "cat" / "readme.txt").write_text("hi")
    with pytest.raises(UserError, match="no images found"):
        load_datasets(folder_cfg(tmp_path / "a"))


def test_imagefolder_class_missing_from_test(tmp_path: Path) -> None:
    write_folder(tmp_path)
    for f in (tmp_path / "test" / "cat").iterdir():
        f.unlink()
    (tmp_path / "test" / "cat").rmdir()
    with pytest.raises(UserError) as err:
        load_datasets(folder_cfg(tmp_path))
    msg = str(err.value)
    assert "missing: cat" in msg and str(tmp_path / "test") in msg


def test_imagefolder_corrupt_image(tmp_path: Path) -> None:
    write_folder(tmp_path)
    bad = tmp_path / "train" / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(UserError, match="cannot read image") as err:
        load_datasets(folder_cfg(tmp_path))
    assert str(bad) in str(err.value)


def test_imagefolder_mixed_sizes(tmp_path: Path) -> None:
    write_folder(tmp_path)
    Image.fromarray(rgb(3, size=24)).save(tmp_path / "train" / "cat" / "small.png")
    # Unset, data.image_size is the first training image's side (as on the streaming path):
    # the 24 px image is resized to it.
    first = sorted((tmp_path / "train").glob("*/*"))[0]
    side = Image.open(first).size[0]
    train, test, _ = load_datasets(folder_cfg(tmp_path))
    assert train.images.shape == (7, 3, side, side) and test.images.shape[1:] == (3, side, side)
    train, _, _ = load_datasets(folder_cfg(tmp_path, image_size=32))
    assert train.images.shape == (7, 3, 32, 32)


# --------------------------------------------------------------------------------------------
# Validation split


def indexed_set(n: int) -> ImageSet:
    images = torch.arange(n, dtype=torch.int64).remainder(256).to(torch.uint8)
    return ImageSet(images.view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous(), torch.arange(n))


@pytest.mark.parametrize("n,fraction,n_val", [(103, 0.1, 10), (100, 0.29, 29), (50, 0.5, 25),
                                              (7, 0.2, 1)])
def test_split_sizes_and_partition(n: int, fraction: float, n_val: int) -> None:
    full = indexed_set(n)
    train, val = split_train_val(full, fraction, seed=0)
    assert val is not None
    assert len(val) == n_val and len(train) == n - n_val
    tr, va = set(train.labels.tolist()), set(val.labels.tolist())
    assert not tr & va
    assert tr | va == set(range(n))
    # images travel with their labels
    assert torch.equal(val.images[:, 0, 0, 0], val.labels.remainder(256).to(torch.uint8))


def test_split_is_seeded() -> None:
    full = indexed_set(200)
    a_train, a_val = split_train_val(full, 0.1, seed=3)
    b_train, b_val = split_train_val(full, 0.1, seed=3)
    _, c_val = split_train_val(full, 0.1, seed=4)
    assert torch.equal(a_val.labels, b_val.labels) and torch.equal(a_train.labels,
                                                                   b_train.labels)
    assert set(a_val.labels.tolist()) != set(c_val.labels.tolist())
    assert a_val.labels.tolist() != list(range(20))  # shuffled, not the first 20


def test_split_without_validation() -> None:
    full = indexed_set(30)
    train, val = split_train_val(full, 0.0, seed=0)
    assert val is None and train is full
    train, val = split_train_val(full, 0.02, seed=0)  # 0.6 images: none
    assert val is None and len(train) == 30


# --------------------------------------------------------------------------------------------
# Augmentation and batches


def random_images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Start at 1: the zero padding is then distinguishable from image content.
    return torch.randint(1, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def crop_flip_candidates(img: torch.Tensor, pad: int = 4) -> list[tuple[int, int, bool,
                                                                        torch.Tensor]]:
    _, h, w = img.shape
    padded = torch.nn.functional.pad(img, (pad, pad, pad, pad))
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            out.append((dy, dx, False, crop))
            out.append((dy, dx, True, crop.flip(-1)))
    return out


def test_crop_flip_outputs_are_pad4_crops() -> None:
    x = random_images(32)
    pre = Preprocess(False, [0.5] * 3, [0.5] * 3, CPU, augment="crop_flip")
    y = pre.apply(x, pre.params(image_seeds(0, torch.arange(len(x)))))
    assert y.shape == x.shape and y.dtype == torch.uint8
    chosen = []
    for i in range(len(x)):
        matches = [(dy, dx, f) for dy, dx, f, c in crop_flip_candidates(x[i])
                   if torch.equal(c, y[i])]
        assert len(matches) == 1, i
        chosen.append(matches[0])
    # The choice varies across the batch: both flips, several offsets.
    assert {f for _, _, f in chosen} == {False, True}
    assert len({(dy, dx) for dy, dx, _ in chosen}) > 10


def test_crop_flip_is_seeded() -> None:
    x = random_images(16)
    pre = Preprocess(False, [0.5] * 3, [0.5] * 3, CPU, augment="crop_flip")
    a = pre.apply(x, pre.params(image_seeds(5, torch.arange(len(x)))))
    b = pre.apply(x, pre.params(image_seeds(5, torch.arange(len(x)))))
    c = pre.apply(x, pre.params(image_seeds(6, torch.arange(len(x)))))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_preprocess_normalisation() -> None:
    x = random_images(4)
    mean, std = [0.4914, 0.4822, 0.4465], [0.247, 0.243, 0.261]
    pre = Preprocess(True, mean, std, CPU)
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / \
        torch.tensor(std).view(1, 3, 1, 1)
    out = pre.to_float(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-5)
    plain = Preprocess(False, mean, std, CPU).to_float(x)
    assert torch.equal(plain, x.float() / 255)  # ToTensor's values, bit for bit
    assert plain.min() > 0 and plain.max() <= 1
    # channels-last: the same values in the trainer's memory format
    last = Preprocess(True, mean, std, CPU, memory_format=torch.channels_last).to_float(x)
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(last, out)


def test_train_batches_cover_the_epoch() -> None:
    n, bs = 50, 16
    labels = torch.arange(n) % 5
    images = random_images(n)
    data = ImageSet(images, labels)
    pre = Preprocess(False, [0.5] * 3, [0.5] * 3, CPU)
    gen = torch.Generator().manual_seed(0)

    batches = list(train_batches(data, bs, gen, pre, drop_last=False))
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert Counter(ys.tolist()) == Counter(labels.tolist())
    # Each image arrives with its own label, scaled to [0, 1]; every image exactly once.
    index = {images[i].numpy().tobytes(): i for i in range(n)}
    order = [index[(x * 255).round().to(torch.uint8).numpy().tobytes()] for x in xs]
    assert sorted(order) == list(range(n))
    assert order != list(range(n))  # shuffled
    assert [int(labels[i]) for i in order] == ys.tolist()

    # drop_last: three full batches, and the next epoch draws another order.
    batches2 = list(train_batches(data, bs, gen, pre, drop_last=True))
    assert [len(y) for _, y in batches2] == [16, 16, 16]
    xs2 = torch.cat([x for x, _ in batches2])
    order2 = [index[(x * 255).round().to(torch.uint8).numpy().tobytes()] for x in xs2]
    assert len(set(order2)) == 48 and order2 != order[:48]


def test_train_batches_seeded_with_augmentation() -> None:
    data = ImageSet(random_images(20), torch.arange(20))
    pre = Preprocess(True, [0.5] * 3, [0.25] * 3, CPU, augment="crop_flip")
    a = list(train_batches(data, 8, torch.Generator().manual_seed(1), pre))
    b = list(train_batches(data, 8, torch.Generator().manual_seed(1), pre))
    assert len(a) == 2
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = list(train_batches(data, 8, torch.Generator().manual_seed(2), pre))
    assert not torch.equal(a[0][0], c[0][0])


def test_eval_batches_in_order() -> None:
    data = ImageSet(random_images(10), torch.arange(10))
    pre = Preprocess(False, [0.5] * 3, [0.5] * 3, CPU)
    batches = list(eval_batches(data, 4, pre))
    assert [y.tolist() for _, y in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert torch.allclose(torch.cat([x for x, _ in batches]), data.images.float() / 255)


@pytest.mark.parametrize("name", ["cifar10", "imagefolder"])
def test_batches_match_the_torchvision_loader(tmp_path: Path, no_md5: None, name: str) -> None:
    """The fast path (uint8 tensors in memory, batched ops) against the seed's (a DataLoader
    with ToTensor over a torchvision data set): the same batch shapes and dtypes, the same
    labels and the same images, each with its own label."""
    if name == "cifar10":
        write_cifar10(tmp_path)
        ref_set = torchvision.datasets.CIFAR10(str(tmp_path), train=True, download=False,
                                               transform=transforms.ToTensor())
    else:
        write_folder(tmp_path)
        # torchvision counts hidden folders as classes; this loader skips them.
        (tmp_path / "train" / ".ipynb_checkpoints").rmdir()
        ref_set = torchvision.datasets.ImageFolder(str(tmp_path / "train"),
                                                   transform=transforms.ToTensor())
    train, _, _ = load_datasets(DataConfig(name=name, root=str(tmp_path), download=False))
    pre = Preprocess(False, [0.5] * 3, [0.5] * 3, CPU)
    for drop_last in (True, False):
        ref = list(torch.utils.data.DataLoader(ref_set, batch_size=4, shuffle=True,
                                               drop_last=drop_last))
        ours = list(train_batches(train, 4, torch.Generator().manual_seed(0), pre, drop_last))
        assert [(x.shape, x.dtype, y.shape, y.dtype) for x, y in ours] == \
            [(x.shape, x.dtype, y.shape, y.dtype) for x, y in ref]

    def pairs(batches: list) -> Counter:
        return Counter((bytes((x * 255).round().to(torch.uint8).flatten().tolist()), int(y))
                       for xs, ys in batches for x, y in zip(xs, ys, strict=True))

    assert pairs(ours) == pairs(ref)  # the last loop ran with drop_last=False: every image
    assert Counter(torch.cat([y for _, y in ours]).tolist()) == Counter(ref_set.targets)


# --------------------------------------------------------------------------------------------
# Synthetic data


def test_synthetic_deterministic_and_balanced() -> None:
    a = synthetic_images(103, 10, 16, seed=0)
    b = synthetic_images(103, 10, 16, seed=0)
    c = synthetic_images(103, 10, 16, seed=1)
    assert a.images.dtype == torch.uint8 and a.images.shape == (103, 3, 16, 16)
    assert a.labels.dtype == torch.int64
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    counts = Counter(a.labels.tolist())
    assert sorted(counts) == list(range(10))
    assert set(counts.values()) == {10, 11}
    assert a.labels[:10].tolist() != list(range(10))  # shuffled


def test_synthetic_is_learnable() -> None:
    # train and test share their class prototypes: nearest class mean classifies the test set.
    train = synthetic_images(200, 4, 16, seed=0)
    test = synthetic_images(100, 4, 16, seed=1)
    means = torch.stack([train.images[train.labels == k].float().mean(0) for k in range(4)])
    dist = torch.cdist(test.images.float().flatten(1), means.flatten(1))
    acc = (dist.argmin(1) == test.labels).float().mean().item()
    assert acc > 0.9


def test_load_synthetic_from_config() -> None:
    cfg = DataConfig(name="synthetic", num_classes=3, train_size=30, test_size=9,
                     image_size=8)
    train, test, classes = load_datasets(cfg)
    assert classes == ["class0", "class1", "class2"]
    assert train.images.shape == (30, 3, 8, 8) and test.images.shape == (9, 3, 8, 8)
    train2, _, _ = load_datasets(cfg)
    assert torch.equal(train.images, train2.images)
    assert not torch.equal(train.images[:9], test.images)


def test_unknown_dataset_rejected() -> None:
    with pytest.raises(UserError, match="mnist"):
        load_datasets(DataConfig(name="mnist", root="/tmp"))
