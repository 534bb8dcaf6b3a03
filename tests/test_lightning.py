"""swa_research.lightning.AveragingCallback in Lightning 2.x runs: the example, the averages
beside the module (never swapped in), their recomputed BN statistics, plans in iterations and
epochs, SWAG at test, snapshots, checkpoint state, and two DDP processes on the CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from swa_research.averaging import (  # noqa: E402
    average_states,
    bn_update,
    make_average,
    predict,
    swag_bma,
)
from swa_research.lightning import AveragingCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lightning_callback.py"


def example():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("lightning_callback", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def fit(callback: AveragingCallback, tmp_path: Path, epochs: int | None = 4,  # noqa: ANN201
        test: bool = False, train: object = None, **trainer_args: object):
    from torch.utils.data import DataLoader

    ex = example()
    pl.seed_everything(0, verbose=False)
    if train is None:
        train = DataLoader(ex.blobs(512, 1), batch_size=64, shuffle=True)
    val = DataLoader(ex.blobs(256, 2), batch_size=128)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", callbacks=[callback],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, **trainer_args)
    model = ex.Classifier()
    trainer.fit(model, train, val)
    if test:
        trainer.test(model, DataLoader(ex.blobs(256, 3), batch_size=128), verbose=False)
    return trainer, model, train


def test_the_example_runs_and_prints_sgd_and_each_average() -> None:
    r = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if "test accuracy" in ln]
    assert [ln.split()[0] for ln in lines] == ["sgd", "swa", "ema", "swag"]


def test_averages_are_scored_beside_the_module_which_is_never_swapped(tmp_path: Path) -> None:
    cb = AveragingCallback({"swa": {}, "ema": {"decay": 0.9}}, start=0.5, unit="epoch")
    trainer, model, train = fit(cb, tmp_path)
    m = trainer.callback_metrics
    for name in ("sgd", "swa", "ema"):
        assert f"{name}/val_loss" in m and f"{name}/val_acc" in m
    assert {"swa/val_nll", "swa/val_ece"} <= set(m)
    # Epochs 2, 3 and 4 of 4 (start 0.5 x 4 = epoch 2, counted from 1).
    assert cb.averages["swa"].n_averaged == cb.averages["ema"].n_averaged == 3
    # The module keeps its SGD weights (Lightning's callbacks copy the average in).
    swa = cb.averages["swa"].module
    assert not torch.equal(swa.net[0].weight, model.net[0].weight)
    # BN statistics of the average: a sample-weighted pass over the training batches.
    expected = make_average("swa", model)
    expected.averaged.load_state_dict(cb.averages["swa"].averaged.state_dict())
    bn_update(list(train), expected.module)
    torch.testing.assert_close(swa.net[1].running_mean, expected.module.net[1].running_mean)
    assert not torch.equal(swa.net[1].running_mean, model.net[1].running_mean)


def test_a_plan_in_iterations_and_swag_at_test(tmp_path: Path) -> None:
    cb = AveragingCallback({"swa": {}, "swag": {"samples": 3, "max_models": 4}}, start=10,
                           freq=3, unit="iter")
    trainer, _, _ = fit(cb, tmp_path, epochs=3, test=True)
    # 8 batches an epoch, 24 steps: n > 10 with n % 3 == 0 -> 12, 15, 18, 21, 24.
    assert cb.averages["swa"].n_averaged == cb.averages["swag"].n_averaged == 5
    m = trainer.callback_metrics
    assert "swag/test_acc" in m and "swag/val_acc" not in m  # SWAG's BMA: at test only
    assert 0.0 < float(m["swag/test_loss"]) < 5.0


def test_snapshots_and_the_checkpoint_state(tmp_path: Path) -> None:
    cb = AveragingCallback(["swa"], start=0.5, snapshot_every=1, snapshot_unit="epoch")
    _, model, _ = fit(cb, tmp_path)
    index = json.loads((tmp_path / "trajectory" / "index.json").read_text())
    assert [s["epoch"] for s in index["snapshots"]] == [1, 2, 3, 4]
    states = [torch.load(tmp_path / "trajectory" / s["file"], weights_only=True)["state_dict"]
              for s in index["snapshots"][1:]]
    posthoc = average_states(model, states)
    for a, b in zip(posthoc.parameters(), cb.averages["swa"].module.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    state = cb.state_dict()
    again = AveragingCallback(["swa"], start=0.5)
    again.load_state_dict(state)  # before the fit builds the averages: kept for then
    again.on_fit_start(None, model)  # type: ignore[arg-type]
    assert again.averages["swa"].n_averaged == 3 and again.last_step == cb.last_step
    other = AveragingCallback(["ema"])
    other.on_fit_start(None, model)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="this callback keeps"):
        other.load_state_dict(state)


def test_posthoc_ema_profiles_in_the_callback(tmp_path: Path) -> None:
    """posthoc_ema=(0.05, 0.10) every 10 steps of 32: saved at 10, 20, 30 and after the last
    step, in the trainer's layout; the last 0.05 profile is the online power EMA of that width
    over every step (to 1e-7), the reconstruction from the saved profiles gives it back, the
    checkpoint state carries the profiles, and other widths are refused on a resume."""
    cb = AveragingCallback({"pe": {"method": "power_ema", "sigma_rel": 0.05}}, start=0, freq=1,
                           unit="iter", posthoc_ema=(0.05, 0.10), posthoc_ema_every=10)
    _, model, _ = fit(cb, tmp_path)
    online = cb.averages["pe"].module
    saved = []
    for w in ("0.05", "0.1"):
        folder = tmp_path / "posthoc_ema" / f"sigma_rel_{w}"
        index = json.loads((folder / "index.json").read_text())
        assert [e["iteration"] for e in index["snapshots"]] == [10, 20, 30, 32]
        assert index["unit"] == "iter" and index["every"] == 10
        saved += [(float(w), e["iteration"], torch.load(folder / e["file"], weights_only=True)
                   ["state_dict"]) for e in index["snapshots"]]
    last = saved[3][2]
    for name, p in online.named_parameters():
        torch.testing.assert_close(last[name], p.detach(), rtol=0, atol=1e-7)
    rebuilt = average_states(model, [st for _, _, st in saved], kind="posthoc_ema",
                             times=[t for _, t, _ in saved], sigma_rels=[w for w, _, _ in saved],
                             sigma_rel=0.05)
    for a, (name, b) in zip(rebuilt.parameters(), online.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
    state = cb.state_dict()
    again = AveragingCallback({"pe": {"method": "power_ema", "sigma_rel": 0.05}},
                              posthoc_ema=(0.05, 0.10), posthoc_ema_every=10)
    again.load_state_dict(state)
    again.on_fit_start(None, model)  # type: ignore[arg-type]
    assert again.profiles[0.05].n_averaged == 32 and len(again.profile_saves) == 4
    other = AveragingCallback({"pe": {"method": "power_ema", "sigma_rel": 0.05}},
                              posthoc_ema=(0.05, 0.2), posthoc_ema_every=10)
    other.on_fit_start(None, model)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"profiles of sigma_rel \['0.05', '0.1'\], this "
                                         r"callback keeps \['0.05', '0.2'\]"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="two or more distinct widths"):
        AveragingCallback(["swa"], posthoc_ema=(0.05,), posthoc_ema_every=10)
    with pytest.raises(ValueError, match="posthoc_ema_every >= 1"):
        AveragingCallback(["swa"], posthoc_ema=(0.05, 0.1))
    with pytest.raises(ValueError, match="sigma_rel=0.5"):
        AveragingCallback(["swa"], posthoc_ema=(0.05, 0.5), posthoc_ema_every=10)


def test_bad_arguments_are_refused_at_once() -> None:
    with pytest.raises(ValueError, match="unit='step'"):
        AveragingCallback(["swa"], unit="step")
    with pytest.raises(ValueError, match="name at least one"):
        AveragingCallback([])
    with pytest.raises(ValueError, match=r"^start=1.5: from 1 on, start counts epochs and must "
                                         "be whole"):
        AveragingCallback(["swa"], start=1.5)
    with pytest.raises(ValueError, match=r"^lawa: unknown option 'k'; expected some of "):
        AveragingCallback({"lawa": {"k": 3}})
    with pytest.raises(ValueError, match=r"^lawa: lawa_k=2.5: must be a whole number"):
        AveragingCallback({"lawa": {"lawa_k": 2.5}})
    with pytest.raises(ValueError, match=r"^ema_slow: decay=1.5: must be in \(0, 1\)"):
        AveragingCallback({"ema_slow": {"method": "ema", "decay": 1.5}})
    with pytest.raises(ValueError, match=r"^ema_slow: method='emma': expected one of"):
        AveragingCallback({"ema_slow": {"method": "emma"}})


def test_two_averages_of_one_method_by_name(tmp_path: Path) -> None:
    """Two EMAs of other decays, each named, logged and kept under its name, each equal to an
    EMA of that decay formed by hand over the same points (the snapshots of every epoch)."""
    cb = AveragingCallback({"ema_fast": {"method": "ema", "decay": 0.5},
                            "ema_slow": {"method": "ema", "decay": 0.9}}, start=0.5,
                           unit="epoch", snapshot_every=1)
    trainer, model, _ = fit(cb, tmp_path)
    assert {"ema_fast/val_loss", "ema_slow/val_loss"} <= set(trainer.callback_metrics)
    index = json.loads((tmp_path / "trajectory" / "index.json").read_text())
    states = [torch.load(tmp_path / "trajectory" / s["file"], weights_only=True)["state_dict"]
              for s in index["snapshots"][1:]]  # epochs 2, 3, 4: the plan's points
    for name, decay in (("ema_fast", 0.5), ("ema_slow", 0.9)):
        assert cb.averages[name].method == "ema" and cb.averages[name].n_averaged == 3
        expected = average_states(model, states, kind="ema", decay=decay)
        for a, b in zip(expected.parameters(), cb.averages[name].module.parameters(),
                        strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.equal(cb.averages["ema_fast"].module.net[0].weight,
                           cb.averages["ema_slow"].module.net[0].weight)


@pytest.mark.parametrize("accumulate", [1, 2, 4])
def test_the_plan_counts_optimizer_steps_under_gradient_accumulation(
        accumulate: int, tmp_path: Path) -> None:
    """8 batches an epoch, 4 epochs: ceil(8 / k) optimizer steps an epoch (global_step); a
    fractional start in iterations is that share of the steps, and the updates follow them."""
    cb = AveragingCallback(["swa"], start=0.5, unit="iter")
    trainer, _, _ = fit(cb, tmp_path, accumulate_grad_batches=accumulate)
    steps = 4 * -(-8 // accumulate)
    assert trainer.global_step == steps
    assert cb.averages["swa"].n_averaged == steps - round(0.5 * steps)  # n > start, freq 1
    epochs = AveragingCallback(["swa"], start=0.5, unit="epoch")
    fit(epochs, tmp_path, accumulate_grad_batches=accumulate)
    assert epochs.averages["swa"].n_averaged == 3  # epochs 2, 3, 4


def test_a_start_beyond_the_budget_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^start=5: no update within the budget of 2 epochs"):
        fit(AveragingCallback(["swa"], start=5, unit="epoch"), tmp_path, epochs=2)


def test_an_unsized_loader_plans_in_steps_from_max_steps(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, IterableDataset

    ex = example()
    data = ex.blobs(512, 1)

    class Stream(IterableDataset):
        def __iter__(self):  # noqa: ANN204
            while True:  # endless, as a language model's token stream
                yield from (data[i] for i in range(len(data)))

    loader = DataLoader(Stream(), batch_size=64)
    with pytest.raises(ValueError, match="the training loader has no length"):
        fit(AveragingCallback(["swa"], start=0.5, unit="epoch"), tmp_path, train=loader,
            epochs=None, max_steps=20)
    with pytest.raises(ValueError, match="give bn_batches=N"):
        fit(AveragingCallback(["swa"], start=0.5, unit="iter"), tmp_path, train=loader,
            epochs=None, max_steps=20)
    cb = AveragingCallback(["swa"], start=0.5, unit="iter", bn_batches=4)
    trainer, model, _ = fit(cb, tmp_path, train=loader, epochs=None, max_steps=20,
                            limit_val_batches=1, val_check_interval=10)
    assert trainer.global_step == 20 and cb.averages["swa"].n_averaged == 10
    assert "swa/val_loss" in trainer.callback_metrics


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {examples!r})
    import lightning_callback as ex
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader
    from swa_research.lightning import AveragingCallback
    pl.seed_everything(0, verbose=False)
    cb = AveragingCallback({{"swa": {{}}, "ema": {{"decay": 0.9}}}}, start=0.5)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=2, strategy="ddp",
                         callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    model = ex.Classifier()
    trainer.fit(model, DataLoader(ex.blobs(512, 1), batch_size=32, shuffle=True),
                DataLoader(ex.blobs(256, 2), batch_size=64))
    flat = torch.cat([p.detach().flatten() for p in cb.averages["swa"].module.parameters()])
    bn = cb.averages["swa"].module.net[1].running_mean
    print(f"RANK {{trainer.global_rank}} n={{cb.averages['swa'].n_averaged}} "
          f"sum={{flat.double().sum().item():.10f}} bn={{bn.double().sum().item():.10f}} "
          f"val_acc={{float(trainer.callback_metrics['swa/val_acc']):.6f}}", flush=True)
    # The script's process group is torn down before the interpreter's: left to exit, gloo's
    # threads were once destroyed while running (std::terminate, SIGABRT after the records).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
""")


@pytest.mark.slow
def test_two_ddp_processes_keep_equal_averages(tmp_path: Path) -> None:
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(examples=str(ROOT / "examples")))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # The two processes share stdout: their lines may arrive interleaved, so read the records
    # wherever they are.
    lines = sorted(re.findall(r"RANK \d n=\d+ sum=\S+ bn=\S+ val_acc=\d\.\d{6}", r.stdout))
    assert len(lines) == 2, r.stdout + r.stderr[-2000:]
    # The same averages, BN statistics (averaged over the ranks) and scores on both ranks.
    assert lines[0].split(" ", 2)[2] == lines[1].split(" ", 2)[2], lines
    assert "n=2" in lines[0]


def test_validate_with_and_copy_at_end_mirror_lightnings_weight_averaging(
        tmp_path: Path) -> None:
    """validate_with=swa: the module's own validation metrics are the average's (as the
    callback scores it beside, on the same set); copy_at_end=swa: the module ends fit with the
    average's weights. Neither by default: the module keeps its SGD weights and metrics."""
    cb = AveragingCallback(["swa"], start=0.5, validate_with="swa", copy_at_end="swa")
    trainer, model, _ = fit(cb, tmp_path)
    m = trainer.callback_metrics
    assert float(m["sgd/val_loss"]) == pytest.approx(float(m["swa/val_loss"]), rel=1e-5)
    for a, b in zip(model.parameters(), cb.averages["swa"].module.parameters(), strict=True):
        assert torch.equal(a, b)
    plain = AveragingCallback(["swa"], start=0.5)
    trainer, model, _ = fit(plain, tmp_path / "plain")
    assert float(trainer.callback_metrics["sgd/val_loss"]) != pytest.approx(
        float(trainer.callback_metrics["swa/val_loss"]), rel=1e-5)
    assert not torch.equal(model.net[0].weight, plain.averages["swa"].module.net[0].weight)
    with pytest.raises(ValueError, match=r"^validate_with='ema': not one of this callback's "
                                         "averages"):
        AveragingCallback(["swa"], validate_with="ema")


@pytest.mark.slow
def test_the_callback_under_fsdp_equals_ddp_and_resumes(tmp_path: Path) -> None:
    """AveragingCallback under Lightning's ModelParallelStrategy (fully_shard in
    configure_model) on two CPU processes against the same fit under DDP
    (tests/lightning_fsdp_run.py): SWA, EMA and SWAG sharded like the module, each rank holding
    half of each; the averages' whole weights and every logged score (SWAG's Bayesian model
    average at test included) and the saved post-hoc EMA profiles equal to DDP's within 1e-6; a
    fit stopped after 2 epochs and resumed from its sharded checkpoint to 3 ends with the
    uninterrupted run's averages and profiles."""
    import json

    script = ROOT / "tests" / "lightning_fsdp_run.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    records = {}
    for mode in ("ddp", "fsdp", "fsdp_resume"):
        out = tmp_path / f"{mode}.json"
        r = subprocess.run([sys.executable, str(script), mode, str(out), str(tmp_path / mode)],
                           capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert r.returncode == 0, (mode, r.stderr[-3000:])
        records[mode] = json.loads(out.read_text())
    ddp = records["ddp"]
    assert ddp["metrics"]["swa/test_acc"] > 0.6  # it learned
    for mode in ("fsdp", "fsdp_resume"):
        rec = records[mode]
        assert set(rec["metrics"]) == set(ddp["metrics"]), mode
        for key, value in ddp["metrics"].items():
            assert rec["metrics"][key] == pytest.approx(value, abs=1e-6), (mode, key)
        for name in ("swa", "ema", "swag"):
            assert rec[name]["n"] == ddp[name]["n"] == 3, (mode, name)
            assert rec[name]["share"] == pytest.approx(0.5, abs=0.02)
            for key, values in ddp[name]["weights"].items():
                worst = max(abs(a - b) for a, b in zip(values, rec[name]["weights"][key],
                                                       strict=True))
                assert worst <= 1e-6, (mode, name, key, worst)
        for w in ("0.05", "0.1"):  # post-hoc EMA profiles: sharded, gathered whole to save
            folder = f"posthoc_ema/sigma_rel_{w}"
            index = json.loads((tmp_path / mode / folder / "index.json").read_text())
            assert [e["iteration"] for e in index["snapshots"]] == [5, 10, 15, 20, 24]
            for e in index["snapshots"]:
                a, b = (torch.load(tmp_path / m / folder / e["file"],
                                   weights_only=True)["state_dict"] for m in ("ddp", mode))
                worst = max((a[k] - b[k]).abs().max().item() for k in a)
                assert set(a) == set(b) and worst <= 1e-6, (mode, w, e, worst)
    assert (tmp_path / "fsdp_resume" / "ckpt" / "last.ckpt" / "meta.pt").is_file()


def test_lightnings_fsdp1_strategy_is_refused_in_one_line() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    cb = AveragingCallback(["swa"])
    with pytest.raises(ValueError, match=r"^AveragingCallback: Lightning's FSDPStrategy \(FSDP1\) "
                                         r"is not supported; use ModelParallelStrategy"):
        cb.on_fit_start(SimpleNamespace(strategy=FSDPStrategy()), None)


class TinyLM(pl.LightningModule):
    """A next-token model: embeddings, a linear layer, logits [B, T, V]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(11, 16)
        self.out = torch.nn.Linear(16, 11)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(x)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x).flatten(0, 1), y.flatten(),
                                                 ignore_index=-1)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def sequences(n: int, seed: int) -> torch.utils.data.TensorDataset:
    """Counting mod 11 from random starts: each token's successor is learnable."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 11, (n, 1), generator=g)
    tokens = (starts + torch.arange(9)) % 11
    y = tokens[:, 1:].clone()
    y[:, -1] = -1  # a padded target: not counted
    return torch.utils.data.TensorDataset(tokens[:, :-1], y)


def test_a_language_models_averages_are_scored_by_loss_and_perplexity(tmp_path: Path) -> None:
    """With no metrics_fn the callback reads the module's outputs: next-token logits [B, T, V]
    with targets [B, T] are scored as a language model (loss per token, targets of -1 not
    counted, and perplexity), equal to language_model_metrics on the average's logits computed
    here; SWAG's Bayesian model average, a classifier's, refuses such logits in one line."""
    from torch.utils.data import DataLoader

    from swa_research.averaging import language_model_metrics

    cb = AveragingCallback(["swa"], start=0.5)
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", callbacks=[cb], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    val = DataLoader(sequences(40, 2), batch_size=16)
    trainer.fit(TinyLM(), DataLoader(sequences(256, 1), batch_size=32), val)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert set(logged) == {"swa/val_loss", "swa/val_ppl"}
    logits, targets = predict(cb.averages["swa"], val)
    want = language_model_metrics(logits, targets)
    assert logged["swa/val_loss"] == pytest.approx(want["loss"], abs=1e-5)
    assert logged["swa/val_ppl"] == pytest.approx(want["ppl"], rel=1e-5)
    assert want["loss"] < 0.5 * math.log(11)  # it learned the successor
    swag = make_average("swag", TinyLM(), samples=2)
    swag.update(TinyLM())
    with pytest.raises(ValueError, match=r"^swag: the Bayesian model average takes a "
                                         r"classifier's logits \[N, C\]; the model gave "
                                         r"\(16, 8, 11\)"):
        swag_bma(swag, lambda: [x for x, _ in val])


def test_checkpoint_with_saves_the_average_as_the_state_dict_and_resumes_the_module(
        tmp_path: Path) -> None:
    """checkpoint_with=swa (Lightning's WeightAveraging's checkpoints): the file's state_dict
    is the average's, BN statistics recomputed, so it loads as the averaged model; the module's
    own weights are under current_model_state, and a fit resumed from the file continues from
    them, not from the average."""
    from torch.utils.data import DataLoader

    cb = AveragingCallback(["swa"], start=0.5, checkpoint_with="swa")
    trainer, model, train = fit(cb, tmp_path)
    path = tmp_path / "avg.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=False)
    avg = cb.averages["swa"].module.state_dict()
    assert set(saved["state_dict"]) == set(avg)
    assert all(torch.equal(saved["state_dict"][k], avg[k]) for k in avg)
    own = model.state_dict()
    assert all(torch.equal(saved["current_model_state"][k], own[k]) for k in own)
    assert not torch.equal(own["net.0.weight"], avg["net.0.weight"])
    bn = cb.averages["swa"].module.net[1].running_mean
    assert not torch.equal(bn, own["net.1.running_mean"])  # recomputed for the average
    ex = example()
    again = ex.Classifier()
    resumed = pl.Trainer(max_epochs=4, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[AveragingCallback(["swa"], start=0.5,
                                                      checkpoint_with="swa")])
    resumed.fit(again, train, DataLoader(ex.blobs(256, 2), batch_size=128), ckpt_path=path)
    assert all(torch.equal(v, own[k]) for k, v in again.state_dict().items())
