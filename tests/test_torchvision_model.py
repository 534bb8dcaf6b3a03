"""model=torchvision: any classification model of torchvision.models by name (model.arch), from
scratch or from model.weights (a local file or a torchvision weights name), its head replaced
when the weights' classes differ. Offline: a download is made to fail."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision
from conftest import compose_config

from swa_research.config import UserError
from swa_research.models import build_model, resolve_model_config
from swa_research.training.build import load_config


def tv(num_classes: int = 10, image_size: int = 32, **options: object) -> torch.nn.Module:
    return build_model(resolve_model_config({"name": "torchvision", **options}), num_classes,
                       image_size)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_builds_by_name_for_the_data_classes(arch: str) -> None:
    torch.manual_seed(0)
    model = tv(10, arch=arch).eval()
    assert type(model) is type(torchvision.models.get_model(arch))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_defaults_are_resnet18_without_weights() -> None:
    assert resolve_model_config({"name": "torchvision"}) == {
        "name": "torchvision", "sync_bn": False, "arch": "resnet18", "weights": None}


def test_unknown_arch_is_refused_with_near_matches() -> None:
    with pytest.raises(UserError, match=r"model\.arch='resnet5O'.*did you mean resnet50") as e:
        resolve_model_config({"name": "torchvision", "arch": "resnet5O"})
    assert "\n" not in str(e.value)


def test_weights_option_is_a_string_or_null() -> None:
    with pytest.raises(UserError, match=r"model\.weights=3: expected a str"):
        resolve_model_config({"name": "torchvision", "weights": 3})


def test_missing_weights_file_is_refused_before_building(tmp_path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError, match=rf"model\.weights={missing}: no such file"):
        resolve_model_config({"name": "torchvision", "weights": str(missing)})


def test_unknown_weights_name_is_refused_offline() -> None:
    with pytest.raises(UserError, match=r"IMAGENET1K_V9.*IMAGENET1K_V1"):
        resolve_model_config({"name": "torchvision", "weights": "IMAGENET1K_V9"})
    with pytest.raises(UserError, match=r"not weights of model\.arch=resnet18"):
        resolve_model_config({"name": "torchvision", "weights": "ResNet50_Weights.DEFAULT"})


@pytest.mark.parametrize("checkpoint", [False, True])
def test_weights_file_round_trip(tmp_path, checkpoint: bool) -> None:
    torch.manual_seed(1)
    source = torchvision.models.resnet18(num_classes=10)
    path = tmp_path / "w.pt"
    state = source.state_dict()
    torch.save({"state_dict": state, "epoch": 3} if checkpoint else state, path)
    torch.manual_seed(2)  # another init: only the file can make them equal
    model = tv(10, arch="resnet18", weights=str(path))
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_weights_for_other_classes_replace_only_the_head(tmp_path) -> None:
    torch.manual_seed(1)
    source = torchvision.models.resnet18()  # 1000 classes, as ImageNet weights
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    model = tv(10, arch="resnet18", weights=str(path))
    assert model.fc.out_features == 10 and model.fc.in_features == 512
    state, loaded = source.state_dict(), model.state_dict()
    assert loaded.keys() == state.keys()
    body = [k for k in state if not k.startswith("fc.")]
    assert all(torch.equal(loaded[k], state[k]) for k in body)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_head_of_a_sequential_classifier_is_replaced(tmp_path) -> None:
    source = torchvision.models.mobilenet_v3_small()  # classifier[-1]: Linear(1024, 1000)
    path = tmp_path / "m.pt"
    torch.save(source.state_dict(), path)
    model = tv(10, arch="mobilenet_v3_small", weights=str(path))
    assert model.classifier[-1].out_features == 10
    assert torch.equal(model.classifier[0].weight, source.classifier[0].weight)


def test_a_model_without_a_linear_head_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "s.pt"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)
    with pytest.raises(ValueError, match=r"squeezenet1_1; its classifier is not a final "
                                         r"nn\.Linear") as e:
        tv(10, arch="squeezenet1_1", weights=str(path))
    assert "\n" not in str(e.value)


def test_a_file_of_another_arch_is_a_one_line_error(tmp_path) -> None:
    path = tmp_path / "m.pt"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=10).state_dict(), path)
    with pytest.raises(ValueError, match=r"does not fit model\.arch=resnet18") as e:
        tv(10, arch="resnet18", weights=str(path))
    assert "\n" not in str(e.value)


def test_a_weights_name_without_network_is_a_one_line_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: a download is needed
    calls = []

    def no_network(url: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    config = resolve_model_config({"name": "torchvision", "weights": "IMAGENET1K_V1"})
    assert not calls  # the config check names the weights but downloads nothing
    with pytest.raises(ValueError, match=r"model\.weights=IMAGENET1K_V1: could not get "
                                         r"ResNet18_Weights\.IMAGENET1K_V1.*URLError.*"
                                         r"model\.weights=PATH") as e:
        build_model(config, 10)
    assert "\n" not in str(e.value)
    assert calls == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]


def test_vit_needs_the_weights_image_size() -> None:
    config = resolve_model_config({"name": "torchvision", "arch": "vit_b_16",
                                   "weights": "IMAGENET1K_V1"})  # the check passes at any size
    with pytest.raises(ValueError, match=r"data\.image_size=32: .*needs 224x224"):
        build_model(config, 10, 32)
    with torch.device("meta"):  # from scratch: any multiple of the patch size
        model = build_model({"name": "torchvision", "arch": "vit_b_16", "weights": None}, 10, 32)
    assert model.image_size == 32
    with pytest.raises(ValueError, match=r"data\.image_size=40: .*patch size 16"):
        build_model({"name": "torchvision", "arch": "vit_b_16", "weights": None}, 10, 40)


def test_composes_and_loads() -> None:
    config = load_config(compose_config(["model=torchvision", "model.arch=resnet18",
                                         "data=synthetic"]))
    assert config.model == {"name": "torchvision", "sync_bn": False, "arch": "resnet18",
                            "weights": None}
    with pytest.raises(UserError, match=r"model\.arch='resnet181'"):
        load_config(compose_config(["model=torchvision", "model.arch=resnet181"]))


def test_regnet_checks_on_the_meta_device() -> None:
    # RegNet computes its block widths with tensors it reads back: not possible on meta.
    config = resolve_model_config({"name": "torchvision", "arch": "regnet_y_400mf"})
    with torch.device("meta"):
        model = build_model(config, 10)
    assert model.fc.out_features == 10


def test_a_torchvision_model_trains_and_its_average_gets_fresh_bn_statistics(
        tmp_path) -> None:
    """model=torchvision model.arch=resnet18 through the whole run: steps, an SWA average, its
    BN update before evaluation (its running statistics are recomputed, not the SGD model's)."""
    from conftest import TINY

    from swa_research.training.build import train

    tiny = [o for o in TINY if not o.startswith("model.")]
    cfg = compose_config([*tiny, "model=torchvision", "model.arch=resnet18",
                          "data.train_size=64", "trainer.batch_size=16", "trainer.epochs=2"])
    metrics = train(cfg, tmp_path / "run")
    assert metrics["status"] == "finished" and metrics["model"]["name"] == "torchvision"
    assert metrics["swa"]["n_averaged"] > 0 and metrics["swa"]["test_acc"] is not None
    sgd = torch.load(tmp_path / "run" / "sgd_final.pt", weights_only=False)["state_dict"]
    swa = torch.load(tmp_path / "run" / "swa.pt", weights_only=False)["state_dict"]
    key = "bn1.running_var"
    assert key in swa and not torch.equal(swa[key], sgd[key])
    assert not torch.equal(swa[key], torch.ones_like(swa[key]))  # not the reset value


@pytest.mark.parametrize("kind", ["garbage", "code", "unreadable", "offline"])
def test_bad_weights_end_the_run_with_one_line_and_a_failed_record(
        tmp_path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """model.weights that cannot be used: a UserError of one line (exit 2 from the entry
    point), metrics.json "failed" with it; a crafted pickle is refused, never run."""
    import json
    import os
    import pickle

    from swa_research.training.build import train

    marker = tmp_path / "pwned"
    path = tmp_path / "w.pt"
    if kind == "garbage":
        path.write_bytes(b"not a checkpoint at all")
        weights, expect = str(path), "not a file of tensors that can be loaded safely"
    elif kind == "code":
        class Evil:
            def __reduce__(self):  # noqa: ANN204
                return (os.system, (f"touch {marker}",))

        path.write_bytes(pickle.dumps(Evil()))
        weights, expect = str(path), "not a file of tensors that can be loaded safely"
    elif kind == "unreadable":  # root reads any mode, so the read itself is made to fail
        path.write_bytes(b"x")

        def denied(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(torch, "load", denied)
        weights, expect = str(path), "cannot be read as a state dict (PermissionError"
    else:
        def offline(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            raise urllib.error.URLError("Name or service not known")

        monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
        weights, expect = "IMAGENET1K_V1", "without network, save those weights to a file"
    run_dir = tmp_path / "run"
    with pytest.raises(UserError) as e:
        train(compose_config(["debug=smoke", "model=torchvision", "model.arch=resnet18",
                              f"model.weights={weights}", "trainer.device=cpu"]), run_dir)
    assert expect in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert len(str(e.value)) < 400
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "failed" and expect in record["error"]
    assert not marker.exists()
