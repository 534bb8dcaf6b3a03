"""The streaming data path (swa_research.data.streaming) on tiny generated image folders: its
evaluation batches equal the in-memory path's, its memory does not grow with the set, a resumed
epoch equals the uninterrupted one whatever the number of workers, shards make up the global
batch, choose_path's decision and the config checks, and the ImageNet presets."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import compose_config

from swa_research.config import DataConfig, UserError, iterations_per_epoch
from swa_research.data import ImageSet, Preprocess, eval_batches
from swa_research.data.streaming import StreamingSet, choose_path, open_image_folder
from swa_research.data.transforms import ImageTransform, image_seeds, random_resized_crop_params
from swa_research.training.averages import check_budget, plan_from_config
from swa_research.training.build import load_config

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def write_folder(root: Path, split: str, per_class: int, classes: int = 3,
                 sizes: tuple[tuple[int, int], ...] = ((40, 30), (30, 44), (36, 36)),
                 fmt: str = "JPEG") -> None:
    """``root/split/c<k>/<i>.jpg|png``: smooth random images of a few sizes (real files)."""
    from PIL import Image

    g = torch.Generator().manual_seed(sum(map(ord, f"{split}{per_class}{fmt}")))
    # Each class has a prototype (the same in every split), each image that prototype mixed
    # with its own noise: a set a model can learn, so that comparisons of runs compare trained
    # models.
    protos = torch.rand(classes, 3, 4, 4, generator=torch.Generator().manual_seed(7))
    ext = "jpg" if fmt == "JPEG" else "png"
    for c in range(classes):
        folder = root / split / f"c{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = sizes[(c + i) % len(sizes)]
            coarse = 0.7 * protos[c] + 0.3 * torch.rand(3, 4, 4, generator=g)
            img = torch.nn.functional.interpolate(coarse[None], size=(h, w), mode="bilinear",
                                                  align_corners=False)[0]
            arr = (img * 255).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(arr).save(folder / f"{i:04d}.{ext}", fmt)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write_folder(tmp_path, "train", 8)
    write_folder(tmp_path, "test", 3, fmt="PNG")
    return tmp_path


def streaming(root: Path, split: str = "train", workers: int = 0, **kw: object) -> StreamingSet:
    options = dict(image_size=24, resize_size=28, augment="random_resized_crop",
                   mean=MEAN, std=STD, num_workers=workers)
    options.update(kw)
    return StreamingSet.from_folder(root / split, **options)  # type: ignore[arg-type]


def collect(batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in batches]


# -- evaluation batches equal the in-memory path's ------------------------------------------------


def test_eval_batches_equal_the_in_memory_path(folder: Path) -> None:
    """The same files decoded with PIL, resized (shorter side 28) and centre-cropped (24) into
    an ImageSet, through data.eval_batches and Preprocess: exactly the streamed batches. The
    classic PIL pipeline (torchvision.transforms Resize/CenterCrop on PIL images) differs only
    by its resampling: within 3/255 before normalisation."""
    from PIL import Image
    from torchvision import transforms as T
    from torchvision.transforms.v2 import functional as F

    s = streaming(folder, "test")
    paths = [Path(s.path(i)) for i in range(len(s))]
    decoded = []
    classic = []
    for p in paths:
        with Image.open(p) as im:
            rgb = im.convert("RGB")
        t = torch.from_numpy(__import__("numpy").asarray(rgb).copy()).permute(2, 0, 1)
        decoded.append(F.center_crop(F.resize(t, [28], antialias=True), [24, 24]))
        classic.append(T.Compose([T.Resize(28), T.CenterCrop(24), T.PILToTensor()])(rgb))
    ref = ImageSet(torch.stack(decoded), s.labels.clone())
    pre = Preprocess(True, MEAN, STD, torch.device("cpu"))
    expected = list(eval_batches(ref, 4, pre))
    got = collect(s.eval_batches(4))
    assert len(got) == len(expected) == 3
    for (x, y), (ex, ey) in zip(got, expected, strict=True):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 24, 24)
        torch.testing.assert_close(x, ex, rtol=0, atol=0)
        assert torch.equal(y, ey)
    classic_x = Preprocess(True, MEAN, STD, torch.device("cpu")).to_float(torch.stack(classic))
    scale = torch.tensor(STD).view(1, 3, 1, 1) * 255
    diff = ((torch.cat([x for x, _ in got]) - classic_x) * scale).abs()
    assert diff.max() <= 3.01, diff.max()


@pytest.mark.parametrize("augment", ["crop_flip", "none"])
def test_both_paths_give_the_same_tensors_on_non_square_images(tmp_path: Path,
                                                               augment: str) -> None:
    """data.in_memory=true and false on non-square images of mixed sizes (30x48 among them):
    the same evaluation tensors, and for one seed the same training crops and flips, batch by
    batch (one transforms module; squashing in memory differed by up to 88 grey levels)."""
    from swa_research.data import build_data, train_batches

    sizes = ((30, 48), (48, 30), (40, 33), (16, 16))
    write_folder(tmp_path, "train", 6, sizes=sizes)
    write_folder(tmp_path, "test", 2, sizes=sizes, fmt="PNG")
    splits = {}
    for mode in ("true", "false"):
        cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=16, augment=augment,
                         val_fraction=0.25, normalize=True, in_memory=mode, cache=False)
        splits[mode] = build_data(cfg, seed=3, device=torch.device("cpu"), num_workers=0)
    mem, stream = splits["true"], splits["false"]
    assert isinstance(mem.train, ImageSet) and isinstance(stream.train, StreamingSet)
    pre = Preprocess(True, MEAN, STD, torch.device("cpu"), augment=augment)
    for name in ("val", "test"):
        a = collect(eval_batches(getattr(mem, name), 5, pre))
        b = collect(eval_batches(getattr(stream, name), 5, pre))
        assert len(a) == len(b) > 0
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert xa.shape[1:] == (3, 16, 16) and torch.equal(xa, xb) and torch.equal(ya, yb)
    a = collect(train_batches(mem.train, 4, torch.Generator().manual_seed(11), pre,
                              drop_last=False))
    b = collect(train_batches(stream.train, 4, torch.Generator().manual_seed(11), pre,
                              drop_last=False))
    assert len(a) == len(b) == 4
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    if augment == "crop_flip":  # the crops did move the pixels
        plain = collect(train_batches(mem.train, 4, torch.Generator().manual_seed(11),
                                      Preprocess(True, MEAN, STD, torch.device("cpu")),
                                      drop_last=False))
        assert not all(torch.equal(x, y) for (x, _), (y, _) in zip(a, plain, strict=True))
    # Unset, data.image_size comes from the first training image on both paths.
    write_folder(tmp_path / "square", "train", 4, sizes=((20, 20), (30, 48)))
    write_folder(tmp_path / "square", "test", 1, sizes=((20, 20),))
    for mode in ("true", "false"):
        cfg = DataConfig(name="imagefolder", root=str(tmp_path / "square"), in_memory=mode,
                         val_fraction=0.0, cache=False)
        assert build_data(cfg, 0, torch.device("cpu")).image_size == 20


def test_train_transform_is_torchvision_v2s(folder: Path) -> None:
    """Per image, the streamed crop and flip are v2.Compose([RandomResizedCrop, Flip]) under
    torch.manual_seed(the image's seed): the same random draws."""
    from torchvision.transforms import v2

    tf = ImageTransform(image_size=24, augment="random_resized_crop")
    reference = v2.Compose([v2.RandomResizedCrop(24, antialias=True), v2.RandomHorizontalFlip()])
    img = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)
    for seed in range(20):
        torch.manual_seed(seed)
        expected = reference(img)
        assert torch.equal(tf.train(img, seed), expected)
    g = torch.Generator().manual_seed(0)
    top, left, h, w = random_resized_crop_params(40, 30, (0.08, 1.0), (0.75, 4 / 3), g)
    assert 0 <= top <= 40 - h and 0 <= left <= 30 - w


# -- memory does not grow with the set -----------------------------------------------------------


PEAK_CHILD = textwrap.dedent("""
    import json, resource, sys, torch
    torch.set_num_threads(1)
    from pathlib import Path
    mode, root = sys.argv[1], Path(sys.argv[2])
    def peak():  # MiB. VmHWM is this process image's own peak: ru_maxrss keeps the peak of
        # the process that forked it (pytest's, which grows over a long run) across exec.
        try:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {}
    for n in ("small", "large"):
        if mode == "streaming":
            from swa_research.data.streaming import StreamingSet
            s = StreamingSet.from_folder(root / n / "train", image_size=96, augment="none",
                                         num_workers=0)
            order = torch.randperm(len(s))
            for x, y in s.train_batches(32, order, drop_last=False):
                pass
            for x, y in s.eval_batches(32):
                pass
        else:
            from swa_research.config import DataConfig
            from swa_research.data import load_datasets
            train, test, _ = load_datasets(DataConfig(name="imagefolder", root=str(root / n),
                                                      cache=False))
            x = train.images.float()  # a touch of work on it, as a run does
        out[n] = peak()
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_set(tmp_path: Path) -> None:
    """Peak RSS after N and after 4N images (96x96, 27 KiB decoded each): the streaming
    path's grows by less than 12 MiB; the in-memory path's by more than 40 MiB (the
    decoded 3N images alone are 81 MiB), so the test can fail."""
    n = 250
    write_folder(tmp_path / "small", "train", n // 2, classes=2, sizes=((96, 96),))
    write_folder(tmp_path / "large", "train", 4 * n // 2, classes=2, sizes=((96, 96),))
    for name in ("small", "large"):
        write_folder(tmp_path / name, "test", 2, classes=2, sizes=((96, 96),))
    peaks = {}
    for mode in ("streaming", "in_memory"):
        out = subprocess.run([sys.executable, "-c", PEAK_CHILD, mode, str(tmp_path)],
                             capture_output=True, text=True, check=True)
        peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    grow = {m: p["large"] - p["small"] for m, p in peaks.items()}
    assert grow["streaming"] < 12, peaks
    assert grow["in_memory"] > 40, peaks


# -- resume, workers, shards ------------------------------------------------------------------


@pytest.mark.parametrize("augment", ["random_resized_crop", "crop_flip"])
def test_resume_mid_epoch_is_exact_with_any_number_of_workers(folder: Path,
                                                              augment: str) -> None:
    s0 = streaming(folder, workers=0, augment=augment)
    order = torch.randperm(len(s0), generator=torch.Generator().manual_seed(3))
    full = collect(s0.train_batches(5, order, aug_seed=11, drop_last=False))
    assert len(full) == 5 and full[-1][0].shape[0] == 4  # 24 images: 4 of 5, one of 4
    resumed = collect(s0.train_batches(5, order, start=2, aug_seed=11, drop_last=False))
    s2 = streaming(folder, workers=2, augment=augment)
    with_workers = collect(s2.train_batches(5, order, start=2, aug_seed=11, drop_last=False))
    again = collect(s2.train_batches(5, order, start=0, aug_seed=11, drop_last=False))
    s2.close()
    for got in (resumed, with_workers):
        assert len(got) == 3
        for (x, y), (ex, ey) in zip(got, full[2:], strict=True):
            assert torch.equal(x, ex) and torch.equal(y, ey)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, full, strict=True))
    # Another aug_seed: other crops of the same images.
    other = collect(s0.train_batches(5, order, aug_seed=12))
    assert torch.equal(other[0][1], full[0][1]) and not torch.equal(other[0][0], full[0][0])
    assert torch.equal(full[0][1], s0.labels[order[:5]])


def test_shards_make_up_the_global_batch(folder: Path) -> None:
    s = streaming(folder)
    order = torch.randperm(len(s), generator=torch.Generator().manual_seed(5))
    whole = collect(s.train_batches(8, order, aug_seed=2))
    shards = [collect(s.train_batches(8, order, aug_seed=2, shard=(r, 4))) for r in range(4)]
    assert len(whole) == 3 and all(len(sh) == 3 for sh in shards)
    for i, (x, y) in enumerate(whole):
        assert all(sh[i][0].shape[0] == 2 for sh in shards)
        assert torch.equal(torch.cat([sh[i][0] for sh in shards]), x)
        assert torch.equal(torch.cat([sh[i][1] for sh in shards]), y)
    # A last partial batch is split into near-equal parts; evaluation into contiguous slices.
    part = [collect(s.train_batches(10, order, aug_seed=2, drop_last=False, shard=(r, 2)))
            for r in range(2)]
    full = collect(s.train_batches(10, order, aug_seed=2, drop_last=False))
    assert torch.equal(torch.cat([part[0][-1][0], part[1][-1][0]]), full[-1][0])
    ev = [collect(s.eval_batches(5, shard=(r, 3))) for r in range(3)]
    assert torch.equal(torch.cat([y for e in ev for _, y in e]), s.labels)
    with pytest.raises(ValueError, match="multiple of the world size"):
        s.train_batches(6, order, shard=(0, 4))


def test_loader_wait_is_measured(folder: Path) -> None:
    s = streaming(folder)
    batches = s.train_batches(4, torch.arange(len(s)), aug_seed=0)
    assert len(batches) == 6
    for _ in batches:
        pass
    assert 0 < batches.wait_s <= batches.elapsed_s
    assert batches.describe().startswith("loader wait ") and batches.describe().endswith("%")
    assert s.wait.total_s == pytest.approx(batches.wait_s)
    assert 0 < s.wait.last_fraction <= 1


def test_splits_follow_the_in_memory_validation_split(folder: Path) -> None:
    from swa_research.data import split_train_val

    cfg = DataConfig(name="imagefolder", root=str(folder), image_size=24, val_fraction=0.25,
                     normalize=True, augment="random_resized_crop", in_memory="false",
                     split_seed=4)
    splits = open_image_folder(cfg, num_workers=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 6, 9)
    ref_train, ref_val = split_train_val(ImageSet(torch.zeros(24, 1, 1, 1, dtype=torch.uint8),
                                                  torch.arange(24)), 0.25, 4)
    full = StreamingSet.from_folder(folder / "train", image_size=24)
    assert [splits.val.path(i) for i in range(6)] == [full.path(int(i)) for i in ref_val.labels]
    assert splits.classes == ["c0", "c1", "c2"] and splits.num_classes == 3
    seeds = image_seeds(7, torch.arange(4))
    assert seeds.dtype == torch.int64 and (seeds >= 0).all() and len(set(seeds.tolist())) == 4


# -- which path, and the config checks ---------------------------------------------------------


def test_choose_path_streams_when_the_estimate_exceeds_the_limit(folder: Path) -> None:
    gb = 10**9
    imagenet = DataConfig(name="imagenet", root="/nowhere", image_size=224, in_memory="auto",
                          augment="none")
    big = 1_281_167 * 3 * 224 * 224
    in_memory, reason = choose_path(imagenet, "cpu", decoded_bytes=big, ram_bytes=24 * gb)
    assert not in_memory
    assert reason == "data: streaming from disk (estimated 193 GB decoded > 50% of 24 GB RAM)"
    assert choose_path(imagenet, "cpu", decoded_bytes=10 * gb, ram_bytes=24 * gb) == (
        True, "data: in memory (estimated 10 GB decoded <= 50% of 24 GB RAM)")
    # On CUDA the GPU's memory is a limit too (the in-memory path keeps the set there).
    in_memory, reason = choose_path(imagenet, "cuda", decoded_bytes=10 * gb, ram_bytes=512 * gb,
                                    gpu_bytes=16 * gb)
    assert not in_memory and "> 50% of 16 GB GPU memory" in reason
    # Forced either way; the crop needs streaming; small sets stay in memory.
    forced = DataConfig(name="imagefolder", root=str(folder), image_size=24, in_memory="False")
    assert choose_path(forced)[0] is False
    assert choose_path(DataConfig(name="imagefolder", root=str(folder), in_memory="True"))[0]
    rrc = DataConfig(name="imagefolder", root=str(folder), image_size=24,
                     augment="random_resized_crop")
    assert "random_resized_crop" in choose_path(rrc)[1]
    assert choose_path(DataConfig(name="cifar10", root="data"))[0]
    # Estimated from the files: 24 + 9 images, 3 x 24 x 24 bytes each, well within the RAM.
    small = DataConfig(name="imagefolder", root=str(folder), image_size=24, memory_fraction=0.1)
    assert choose_path(small, ram_bytes=gb) == (
        True, "data: in memory (estimated 5.7e-05 GB decoded <= 10% of 1 GB RAM)")
    assert choose_path(small, ram_bytes=100_000)[0] is False
    # Without data.image_size the first training image must be square (it gives the size, on
    # either path); here it is 40x30.
    no_size = DataConfig(name="imagefolder", root=str(folder), memory_fraction=0.1)
    with pytest.raises(UserError, match=r"^data.image_size is not set and the first training "
                                        r"image .*0000.jpg is 40x30, not square"):
        open_image_folder(no_size, num_workers=0)


@pytest.mark.parametrize(("override", "message"), [
    ("data.in_memory=maybe", "data.in_memory='maybe': expected auto, true or false"),
    ("data.memory_fraction=1.5", "data.memory_fraction=1.5: must be in (0, 1]"),
    ("data.resize_size=200", "data.resize_size=200: smaller than data.image_size=224 (the "
                             "centre crop would pad)"),
    ("data.crop_scale=[0.5,0.1]", "data.crop_scale=[0.5, 0.1]: expected [min, max] with "
                                  "0 < min <= max <= 1"),
    ("data.prefetch_factor=0", "data.prefetch_factor=0: must be at least 1"),
    ("data.test_split=train", "data.test_split='train': must name a folder next to train/ "
                              "(test, val)"),
    ("data.augment=random_resized_crop data.in_memory=true",
     "data.augment=random_resized_crop: crops each image while decoding, so it needs "
     "data.in_memory=auto or false"),
])
def test_bad_values_are_one_line_user_errors(override: str, message: str) -> None:
    with pytest.raises(UserError) as e:
        load_config(compose_config(["data=imagenet", *override.split()]))
    assert str(e.value) == message


def test_streaming_needs_an_image_folder() -> None:
    with pytest.raises(UserError, match=r"^data.in_memory=false: only image folders stream"):
        load_config(compose_config(["data=cifar10", "data.in_memory=false"]))
    with pytest.raises(UserError, match=r"^data.augment=random_resized_crop: needs an image"):
        load_config(compose_config(["data=cifar10", "data.augment=random_resized_crop"]))


# -- the ImageNet presets --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet50", "resnet152", "densenet161"])
def test_imagenet_presets_compose_and_validate(arch: str) -> None:
    c = load_config(compose_config([f"experiment=imagenet/{arch}_swa"]))
    assert (c.data.name, c.data.test_split, c.data.in_memory) == ("imagenet", "val", "False")
    assert (c.data.image_size, c.data.resize_size, c.data.augment) == (
        224, 256, "random_resized_crop")
    assert c.model["arch"] == arch and c.model["weights"] == "IMAGENET1K_V1"
    assert (c.schedule.name, c.optimizer.lr, c.swa.lr, c.trainer.epochs) == (
        "cyclical", 1e-3, 1e-5, 10)
    iters = iterations_per_epoch(1_281_167, c.trainer.batch_size, c.trainer.drop_last)
    assert c.schedule.cycle == iters == 5004  # one cycle per epoch
    check_budget(c, iters)
    plan = plan_from_config(c.swa, c.schedule, c.trainer.epochs, iters)
    assert plan.update_points() == [5004 * k for k in range(1, 11)]  # the end of every epoch
    header = (Path(__file__).resolve().parent.parent / "swa_research" / "conf" / "experiment"
              / "imagenet" / f"{arch}_swa.yaml").read_text()
    assert header.startswith("# @package _global_\n") and "Table 2" in header
    assert "Source of the figures" in header


# -- through the trainer ---------------------------------------------------------------------


def square_folder(root: Path) -> Path:
    """32x32 images only, so that the in-memory path needs no resize either."""
    write_folder(root, "train", 16, sizes=((32, 32),))
    write_folder(root, "test", 4, sizes=((32, 32),))
    return root


def folder_run(root: Path, *extra: str) -> list[str]:
    return ["data=imagefolder", f"data.root={root}", "data.image_size=32", "data.cache=false",
            "data.val_fraction=0.25", "model.width=0.0625", "model.dropout=0", "optimizer=sgd",
            "optimizer.lr=0.05", "trainer.batch_size=8", "trainer.eval_batch_size=16",
            "trainer.device=cpu", "trainer.progress=none", "trainer.num_workers=0", *extra]


def test_a_streamed_epoch_trains_and_evaluates_as_the_in_memory_path(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The same images, order and transforms (no augmentation) through the trainer on both
    paths, streamed with and without worker processes: the same training loss, validation and
    test results (dropout on: the workers leave the training's random stream alone); the log
    names the path."""
    import logging

    from swa_research.training.build import train

    root = square_folder(tmp_path / "data")
    results = {}
    for mode, workers in (("true", 0), ("false", 0), ("false", 2)):
        name = f"{mode}_{workers}"
        with caplog.at_level(logging.INFO):
            caplog.clear()
            # Three epochs of Adam: a run that learns (test loss about 0.54 against ln 3 = 1.10
            # at chance), so that equal results compare trained models.
            cfg = compose_config(folder_run(root, f"data.in_memory={mode}", "swa=none",
                                            "trainer.epochs=3", "model.dropout=0.3",
                                            "optimizer=adam", "optimizer.lr=3e-3",
                                            "data.normalize=true",
                                            f"trainer.num_workers={workers}"))
            results[name] = train(cfg, tmp_path / f"run_{name}")
            log = caplog.text
        if mode == "false":
            assert "data: streaming" in log and "loader wait" in log
        else:
            assert "data: in memory" in log
    a = results["true_0"]
    assert a["sgd"]["test_loss"] < 0.7 * math.log(3), a["sgd"]
    ha = (tmp_path / "run_true_0" / "history.csv").read_text().splitlines()[1].split(",")
    for name in ("false_0", "false_2"):
        b = results[name]
        assert b["status"] == "finished"
        for key in ("test_acc", "val_acc"):
            assert b["sgd"][key] == a["sgd"][key], name
        for key in ("test_loss", "val_loss"):
            assert b["sgd"][key] == pytest.approx(a["sgd"][key], rel=1e-5), name
        hb = (tmp_path / f"run_{name}" / "history.csv").read_text().splitlines()[1].split(",")
        assert float(hb[3]) == pytest.approx(float(ha[3]), rel=1e-5), name  # train loss


@pytest.mark.slow
def test_a_streamed_run_killed_mid_epoch_resumes_exactly(tmp_path: Path) -> None:
    """Random-resized crops decoded in two worker processes, SWA with its BN pass: SIGTERM in
    the second epoch, a rerun resumes inside that epoch, and the run ends bit for bit as an
    uninterrupted one."""
    from conftest import fault_env

    root = square_folder(tmp_path / "data")
    args = folder_run(root, "data.in_memory=false", "data.augment=random_resized_crop",
                      "data.image_size=24", "trainer.num_workers=2", "trainer.epochs=3",
                      "model.batch_norm=true", "swa.start=0.34", "swa.freq=1",
                      "trainer.deterministic=true")
    base = {k: v for k, v in os.environ.items() if not k.startswith("SWA_RESEARCH_FAULT")}

    def run(run_dir: Path, fault: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**base, "OMP_NUM_THREADS": "1", **fault_env(fault)}
        return subprocess.run([sys.executable, "-m", "swa_research.train", *args,
                               f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)

    stopped = run(tmp_path / "run", "step@7:TERM")  # 4 steps an epoch: inside epoch 2
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    resumed = run(tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "resumed at iteration 7 (epoch 2)" in log
    straight = run(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert (tmp_path / "run" / "history.csv").read_text() == \
        (tmp_path / "straight" / "history.csv").read_text()
    for name in ("sgd_final.pt", "swa.pt"):
        a = torch.load(tmp_path / "run" / name, weights_only=False)["state_dict"]
        b = torch.load(tmp_path / "straight" / name, weights_only=False)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("workers", [0, 1])
def test_a_truncated_jpeg_is_one_line_with_or_without_workers(folder: Path,
                                                              workers: int) -> None:
    """A worker's UserError arrives as the loader's "Caught UserError in DataLoader worker
    process 0" plus a traceback; the set hands on the worker's one line."""
    victim = sorted((folder / "train").glob("*/*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated inside its header
    s = streaming(folder, workers=workers)
    with pytest.raises(UserError) as e:
        collect(s.eval_batches(4))
    msg = str(e.value)
    assert msg.startswith(f"cannot read image {victim}: ") and "\n" not in msg, msg
    assert "DataLoader worker" not in msg and "Traceback" not in msg
