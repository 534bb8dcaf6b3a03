"""model=timm: any timm image model by name, trained and averaged like the built-in ones, from
timm's init or from weights; and the EMA of BN statistics checked against timm's ModelEmaV3."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose_config
from torch import nn

from swa_research.config import UserError
from swa_research.models import build_model, resolve_model_config
from swa_research.training.build import train

timm = pytest.importorskip("timm")

RUN = ["data=synthetic", "data.train_size=96", "data.test_size=32", "trainer.epochs=2",
       "trainer.batch_size=32", "trainer.eval_batch_size=32", "trainer.num_workers=0",
       "trainer.progress=none", "trainer.device=cpu", "swa.start=0.5", "swa.freq=1",
       "model=timm"]


def has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# timm's own small test networks (its test_* models): the same code paths, a fraction of the
# time; resnet18 and vit_tiny_patch16_224 as the real ones that need an image size.
@pytest.mark.parametrize(("arch", "bn"), [("test_resnet", True), ("test_efficientnet", True),
                                          ("test_convnext", False), ("test_vit", False),
                                          ("vit_tiny_patch16_224", False)])
def test_timm_models_build_for_the_data(arch: str, bn: bool) -> None:
    model = build_model(resolve_model_config({"name": "timm", "arch": arch}), 10, 32)
    assert has_bn(model) == bn
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
def test_a_timm_model_trains_and_is_averaged(arch: str, tmp_path: Path) -> None:
    """With BN (the average's statistics recomputed) and without; swa.pt loads into timm's
    model of that arch."""
    m = train(compose_config([*RUN, f"model.arch={arch}"]), tmp_path)
    assert m["status"] == "finished" and m["swa"]["n_averaged"] > 0
    assert 0.0 <= m["swa"]["test_acc"] <= 1.0
    fresh = timm.create_model(arch, num_classes=10, **({"img_size": 32} if "vit" in arch
                                                         else {}))  # as model=timm builds it
    state = torch.load(tmp_path / "swa.pt", map_location="cpu")["state_dict"]
    fresh.load_state_dict(state)  # the same names and shapes
    sgd = torch.load(tmp_path / "sgd_final.pt", map_location="cpu")["state_dict"]
    assert any(not torch.equal(sgd[k], state[k]) for k in state)  # an average, not a copy


def test_weights_from_a_file_with_another_head(tmp_path: Path) -> None:
    """1000-class weights into a 10-class model: the backbone is the file's, the classifier
    is made afresh (timm's own adaptation)."""
    source = timm.create_model("test_resnet", num_classes=1000)
    path = tmp_path / "test_resnet.pth"
    torch.save(source.state_dict(), path)
    model = build_model(resolve_model_config({"name": "timm", "arch": "test_resnet",
                                              "weights": str(path)}), 10, 32)
    mine, theirs = model.state_dict(), source.state_dict()
    backbone = [k for k in theirs if not k.startswith("fc.")]
    assert backbone and all(torch.equal(mine[k], theirs[k]) for k in backbone)
    assert mine["fc.weight"].shape == (10, 96)
    same = build_model(resolve_model_config({"name": "timm", "arch": "test_resnet",
                                             "weights": str(path)}), 1000, 32)
    assert all(torch.equal(same.state_dict()[k], v) for k, v in theirs.items())


def test_pretrained_offline_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at its import: its constant too (no network
    # here, where a download attempt would wait for its timeout).
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ValueError) as e:
        build_model(resolve_model_config({"name": "timm", "arch": "test_resnet",
                                          "weights": "pretrained"}), 10, 32)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("model.weights=pretrained: could not load timm's weights of test_resnet")
    assert msg.endswith("pass model.weights=PATH")


@pytest.mark.parametrize(("override", "match"), [
    ("model.arch=convnext_attto", r"model.arch=convnext_attto: not a timm model; did you "
                                  r"mean convnext_atto"),
    ("model.weights=/no/such.pth", "model.weights=/no/such.pth: neither 'pretrained' nor a "
                                   "file"),
    ("+model.width=2", r"model.width: not an option of model timm"),
])
def test_bad_timm_options_are_one_line(override: str, match: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=match):
        train(compose_config([*RUN, override]), tmp_path)


@pytest.mark.parametrize("warmup", [False, True])
def test_an_ema_of_bn_statistics_equals_timms_model_ema_v3(warmup: bool) -> None:
    """swa.ema_buffers=average against timm.utils.ModelEmaV3 on one sequence of weights and BN
    statistics: every parameter and buffer equal (the warm-up: timm's step n+1 at our n-th
    point after the first)."""
    from timm.utils import ModelEmaV3

    from swa_research.averaging import make_average

    torch.manual_seed(0)
    model = build_model(resolve_model_config({"name": "timm", "arch": "test_resnet"}), 10, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ours = make_average("ema", model, decay=0.9, ema_warmup=warmup, ema_buffers="average")
    theirs = None
    for n in range(6):
        model.train()
        loss = model(torch.randn(8, 3, 32, 32)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ours.update(model)
        if warmup:
            theirs = theirs or ModelEmaV3(model, decay=0.9, use_warmup=True)
            theirs.update(model, step=n + 1)
        elif theirs is None:  # ModelEmaV3 starts as a copy of the model: the first point
            theirs = ModelEmaV3(model, decay=0.9)
        else:
            theirs.update(model)
    assert theirs is not None
    mine, ref = ours.module.state_dict(), theirs.module.state_dict()
    assert mine.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(mine[k], ref[k], rtol=0, atol=2e-6, msg=k)
    assert any("running_var" in k for k in ref)
    assert not torch.equal(mine["bn1.running_mean"], model.state_dict()["bn1.running_mean"])
