"""EDM2's post-hoc EMA: the reconstruction's coefficients against EDM2's formulas and
ema-pytorch's PostHocEMA, its weights against ema-pytorch's synthesized model and against the
online power EMA of the same width, and the run's profiles and the post-hoc tool's rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, StepCrash, compose_config
from omegaconf import OmegaConf
from torch import nn

from swa_research.analysis import posthoc
from swa_research.averaging.power_ema import (
    PowerEMA,
    combine_states,
    posthoc_ema_coefficients,
    sigma_rel_to_gamma,
)
from swa_research.config import UserError
from swa_research.training.build import train


def edm2_coefficients(t_in: list[float], sigma_in: list[float], t_out: float,
                      sigma_out: float) -> np.ndarray:
    """NVlabs/edm2 ``solve_posthoc_coefficients`` (training/phema.py), written here from the
    paper's Algorithm 3: p_dot_p of the profiles, least squares."""
    def p_dot_p(ta, ga, tb, gb):  # noqa: ANN001, ANN202
        ratio = ta / tb
        exp = np.where(ta < tb, gb, -ga)
        return (ga + 1) * (gb + 1) * ratio ** exp / ((ga + gb + 1) * np.maximum(ta, tb))

    rv = lambda x: np.float64(x).reshape(-1, 1)  # noqa: E731
    cv = lambda x: np.float64(x).reshape(1, -1)  # noqa: E731
    g_in = [sigma_rel_to_gamma(s) for s in sigma_in]
    a = p_dot_p(rv(t_in), rv(g_in), cv(t_in), cv(g_in))
    b = p_dot_p(rv(t_in), rv(g_in), cv([t_out]), cv([sigma_rel_to_gamma(sigma_out)]))
    return np.linalg.lstsq(a, b, rcond=None)[0].reshape(-1)


TIMES = [100, 200, 300, 400, 500] * 2
WIDTHS = [0.05] * 5 + [0.10] * 5


@pytest.mark.parametrize(("at", "sigma_rel"), [(500, 0.07), (500, 0.02), (300, 0.15)])
def test_coefficients_are_edm2s_and_ema_pytorchs(at: int, sigma_rel: float) -> None:
    ours = posthoc_ema_coefficients(TIMES, WIDTHS, at, sigma_rel)
    np.testing.assert_allclose(ours, edm2_coefficients(TIMES, WIDTHS, at, sigma_rel),
                               rtol=0, atol=1e-12)
    ema_pytorch = pytest.importorskip("ema_pytorch.post_hoc_ema")
    theirs = ema_pytorch.solve_weights(
        torch.tensor(TIMES), torch.tensor([ema_pytorch.sigma_rel_to_gamma(s) for s in WIDTHS]),
        torch.tensor([at]), torch.tensor([ema_pytorch.sigma_rel_to_gamma(sigma_rel)]))
    np.testing.assert_allclose(ours, theirs.squeeze(-1).numpy(), rtol=0, atol=1e-6)


def test_a_tracked_width_is_its_own_profile() -> None:
    """Reconstructing a width that was saved, at a saved step: that profile, weight 1."""
    w = posthoc_ema_coefficients(TIMES, WIDTHS, 500, 0.10)
    expected = np.zeros(10)
    expected[9] = 1.0
    np.testing.assert_allclose(w, expected, atol=1e-9)


def test_the_weights_equal_ema_pytorchs_synthesized_model(tmp_path: Path) -> None:
    """ema-pytorch's PostHocEMA trained on one sequence of weights saves its profiles; our
    reconstruction from those same files equals its synthesize_ema_model within 1e-6."""
    ema_pytorch = pytest.importorskip("ema_pytorch")
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    phema = ema_pytorch.PostHocEMA(model, sigma_rels=(0.05, 0.10), update_every=1,
                                   checkpoint_every_num_steps=10,
                                   checkpoint_folder=str(tmp_path / "ckpt"),
                                   checkpoint_dtype=torch.float32)
    for _ in range(60):
        with torch.no_grad():
            model.weight.add_(0.1 * torch.randn(8, 8))
            model.bias.add_(0.1 * torch.randn(8))
        phema.update()
    synthesized = phema.synthesize_ema_model(sigma_rel=0.07)
    files = sorted((tmp_path / "ckpt").glob("*.pt"))
    times = [int(f.stem.split(".")[1]) for f in files]
    widths = [(0.05, 0.10)[int(f.stem.split(".")[0])] for f in files]
    states = [{k.removeprefix("ema_model."): v for k, v in torch.load(f).items()
               if k.startswith("ema_model.")} for f in files]
    mine = combine_states(states, posthoc_ema_coefficients(times, widths, max(times), 0.07))
    theirs = synthesized.ema_model.state_dict()
    assert set(mine) == set(theirs) and len(files) == 12
    for k in theirs:
        torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=1e-6)


def test_the_reconstruction_equals_the_online_power_ema_within_the_measured_bound() -> None:
    """2,000 steps of a drifting, noisy weight; profiles 0.05 and 0.10 saved every 100 steps
    (20 saves each): the reconstructed 0.07 and 0.15 equal the online power EMAs of those
    widths to 1e-3 of their distance from the final weights (measured: 3.4e-4 and 5.3e-4), the
    narrower 0.02 to 0.1 (measured 4.3e-2: outside the saved widths the fit is looser)."""
    torch.manual_seed(0)
    model = nn.Linear(50, 50).requires_grad_(False)
    profiles = {s: PowerEMA(model, sigma_rel=s, bn_update=False) for s in (0.05, 0.10)}
    online = {s: PowerEMA(model, sigma_rel=s, bn_update=False) for s in (0.02, 0.07, 0.15)}
    saved = []
    drift = torch.randn(50, 50) * 0.01
    for t in range(1, 2001):
        model.weight.add_(drift + 0.05 * torch.randn(50, 50))
        for p in [*profiles.values(), *online.values()]:
            p.update(model)
        if t % 100 == 0:
            saved += [(s, t, {k: v.clone() for k, v in p.module.state_dict().items()})
                      for s, p in profiles.items()]
    for s, bound in ((0.07, 1e-3), (0.15, 1e-3), (0.02, 0.1)):
        w = posthoc_ema_coefficients([t for _, t, _ in saved], [x for x, _, _ in saved],
                                     2000, s)
        rebuilt = combine_states([x for _, _, x in saved], w.tolist())["weight"]
        ref = online[s].module.weight
        assert (rebuilt - ref).norm() / (ref - model.weight).norm() < bound, s
    # Profiles saved in bf16: their rounding, amplified by the coefficients, dominates
    # (measured: 2.5e-2 at 0.07, against 3.4e-4 in fp32).
    w = posthoc_ema_coefficients([t for _, t, _ in saved], [x for x, _, _ in saved], 2000, 0.07)
    rebuilt = combine_states([{k: v.bfloat16() for k, v in x.items()} for _, _, x in saved],
                             w.tolist())["weight"].float()
    ref = online[0.07].module.weight
    assert 1e-2 < (rebuilt - ref).norm() / (ref - model.weight).norm() < 5e-2


# Beside the profiles, the online power EMA of one of their widths updated after every step.
RUN = [*TINY, "trainer.epochs=4", "trainer.posthoc_ema=[0.05,0.10]",
       "trainer.posthoc_ema_every=4", "swa.start=0", "swa.freq=1",
       "swa.also=[{name:pe05,method:power_ema,sigma_rel:0.05}]"]


@pytest.fixture(scope="module")
def profile_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("phema") / "run"
    cfg = compose_config(RUN)
    train(cfg, run_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return run_dir


def test_a_run_saves_its_profiles_every_n_steps_and_after_the_last(profile_run: Path) -> None:
    """12 steps (4 epochs of 3), saves every 4: steps 4, 8, 12; the profile at step 12 is
    the online power EMA of its width over every step."""
    for s in ("0.05", "0.1"):
        files = sorted(p.name for p in (profile_run / "posthoc_ema" / f"sigma_rel_{s}")
                       .glob("it*.pt"))
        assert files == ["it000004.pt", "it000008.pt", "it000012.pt"]
    online = torch.load(profile_run / "pe05.pt")["state_dict"]
    saved = torch.load(profile_run / "posthoc_ema" / "sigma_rel_0.05" / "it000012.pt")
    params = [k for k, v in saved["state_dict"].items() if v.is_floating_point()
              and "running" not in k]
    assert params
    for k in params:
        torch.testing.assert_close(saved["state_dict"][k], online[k], rtol=0, atol=1e-7, msg=k)


def test_the_posthoc_tool_reconstructs_and_evaluates_widths(profile_run: Path) -> None:
    assert posthoc.main([str(profile_run), "--ema-sigma-rel", "0.03,0.05,0.2",
                         "--device", "cpu"]) == 0
    with open(profile_run / "posthoc.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["kind"], r["sigma_rel"], r["last"], r["n_points"]) for r in rows] == [
        ("posthoc_ema", "0.03", "12", "6"), ("posthoc_ema", "0.05", "12", "6"),
        ("posthoc_ema", "0.2", "12", "6")]
    assert all(float(r["val_loss"]) > 0 for r in rows)
    assert (profile_run / "posthoc_ema.png").stat().st_size > 1000
    assert posthoc.main([str(profile_run), "--ema-sigma-rel", "--at", "8",
                         "--device", "cpu"]) == 0
    with open(profile_run / "posthoc.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(posthoc.DEFAULT_SIGMA_RELS) and {r["last"] for r in rows} == {"8"}
    assert {r["n_points"] for r in rows} == {"4"}


def test_profiles_saved_in_bf16_are_said_to_approximate(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_config([*RUN, "trainer.snapshot_dtype=bf16"])
    train(cfg, run_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    saved = torch.load(run_dir / "posthoc_ema" / "sigma_rel_0.05" / "it000012.pt")
    assert {v.dtype for v in saved["state_dict"].values() if v.is_floating_point()} == {
        torch.bfloat16}
    capsys.readouterr()
    assert posthoc.main([str(run_dir), "--ema-sigma-rel", "0.07", "--device", "cpu"]) == 0
    assert "note: the profiles were saved in bf16" in capsys.readouterr().out


@pytest.mark.parametrize(("flags", "message"), [
    (["--ema-sigma-rel", "0.05", "--at", "5"], "--at=5: the profiles were saved at steps 4..12"),
    (["--ema-sigma-rel", "0.5"], "--ema-sigma-rel='0.5': 0.5 is out of range"),
])
def test_bad_posthoc_ema_flags_are_one_line(profile_run: Path, flags: list[str], message: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert posthoc.main([str(profile_run), *flags, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_a_corrupt_or_missing_profile_is_one_line(profile_run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A profile file cut short, or listed in its index but gone: exit 2 with one line that
    names the file; nothing of the run is changed."""
    import shutil

    for damage in ("truncate", "remove"):
        run_dir = tmp_path / damage
        shutil.copytree(profile_run, run_dir)
        (run_dir / "posthoc.csv").unlink(missing_ok=True)
        victim = run_dir / "posthoc_ema" / "sigma_rel_0.1" / "it000008.pt"
        if damage == "truncate":
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        else:
            victim.unlink()
        capsys.readouterr()
        assert posthoc.main([str(run_dir), "--ema-sigma-rel", "0.07", "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        assert str(victim) in err, err
        assert ("cannot be read" if damage == "truncate" else "listed in its index.json but "
                "missing") in err, err
        assert not (run_dir / "posthoc.csv").exists()


@pytest.mark.parametrize(("overrides", "message"), [
    (["trainer.posthoc_ema=[0.05]", "trainer.posthoc_ema_every=4"], "two or more distinct"),
    (["trainer.posthoc_ema=[0.05,0.5]", "trainer.posthoc_ema_every=4"], "two or more distinct"),
    (["trainer.posthoc_ema=[0.05,0.1]"], "trainer.posthoc_ema_every=0: set the steps"),
])
def test_bad_posthoc_ema_keys_are_refused(overrides: list[str], message: str,
                                          tmp_path: Path) -> None:
    with pytest.raises(UserError, match=message):
        train(compose_config([*TINY, *overrides]), tmp_path / "run")


def test_the_library_reconstructs_with_average_states() -> None:
    """average_states(kind="posthoc_ema"): a saved width at a saved time gives that profile;
    another width, the coefficients' combination."""
    from swa_research.averaging import average_states

    torch.manual_seed(1)
    model = nn.Linear(4, 3)
    profiles = {s: PowerEMA(model, sigma_rel=s, bn_update=False) for s in (0.05, 0.10)}
    saved = []
    for t in range(1, 41):
        with torch.no_grad():
            model.weight.add_(torch.randn(3, 4))
        for s, p in profiles.items():
            p.update(model)
            if t % 10 == 0:
                saved.append((s, t, {k: v.clone() for k, v in p.module.state_dict().items()}))
    times, widths, states = zip(*[(t, s, st) for s, t, st in saved], strict=True)
    same = average_states(model, states, kind="posthoc_ema", times=times, sigma_rels=widths,
                          sigma_rel=0.05)
    torch.testing.assert_close(same.weight, profiles[0.05].module.weight, rtol=0, atol=1e-5)
    other = average_states(model, states, kind="posthoc_ema", times=times, sigma_rels=widths,
                           sigma_rel=0.07, at=30)
    early = [i for i, t in enumerate(times) if t <= 30]  # the profiles saved up to step 30
    w = posthoc_ema_coefficients([times[i] for i in early], [widths[i] for i in early], 30, 0.07)
    want = sum(float(c) * states[i]["weight"].double() for c, i in zip(w, early, strict=True))
    torch.testing.assert_close(other.weight.double(), want, rtol=0, atol=1e-6)
    assert not torch.equal(model.weight, other.weight)  # model itself untouched, a new network
    with pytest.raises(ValueError, match="needs times= and sigma_rels="):
        average_states(model, states, kind="posthoc_ema")


def test_the_sweep_report_pairs_posthoc_ema_gains_by_run(tmp_path: Path) -> None:
    """Three seeds whose posthoc.csv holds post-hoc EMA rows: the report gains their columns
    and their gain over SGD paired by run (computed here by hand), and report_posthoc_ema.png."""

    import yaml

    from swa_research.analysis.report import write_report

    sweep = tmp_path / "sweep"
    acc = {0: (0.50, 0.56, 0.52), 1: (0.60, 0.62, 0.61), 2: (0.55, 0.61, 0.55)}  # sgd, 0.05, 0.1
    for seed, (sgd, a05, a10) in acc.items():
        run = sweep / str(seed)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={seed}"]))
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
            {"seed": seed, "logger": {"backend": "none"}}))
        (run / "metrics.json").write_text(json.dumps({
            "status": "finished", "sgd": {"test_acc": sgd, "test_loss": 1 - sgd,
                                          "val_loss": 1.1 - sgd},
            "sgd_best_val": {"test_acc": sgd, "test_loss": 1 - sgd},
            "swa": {"test_acc": sgd + 0.01, "test_loss": 0.99 - sgd, "val_loss": 1.09 - sgd}}))
        (run / "posthoc.csv").write_text(
            "kind,sigma_rel,n_points,val_loss,val_acc,test_loss,test_acc\n"
            f"posthoc_ema,0.05,6,{1.1 - a05},0.5,{1 - a05},{a05}\n"
            f"posthoc_ema,0.1,6,{1.1 - a10},0.5,{1 - a10},{a10}\n")
    report = write_report(sweep, use_wandb=False)
    assert report.averages == ["posthoc_ema_0.05", "posthoc_ema_0.1"]
    row = report.rows[0]
    gains = [a - s for s, a, _ in acc.values()]  # 0.06, 0.02, 0.06
    assert row.gains["posthoc_ema_0.05"].mean == pytest.approx(sum(gains) / 3)
    assert row.gains["posthoc_ema_0.1"].mean == pytest.approx((0.02 + 0.01 + 0.0) / 3)
    assert "POSTHOC_EMA_0.05 acc %" in report.table
    assert (sweep / "report_posthoc_ema.png").stat().st_size > 1000


def test_profiles_under_fsdp_are_the_unsharded_ones_and_resume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.strategy=fsdp (over a group of one here; two ranks in tests/test_fsdp.py): each
    saved profile is a torch.distributed.checkpoint folder holding, read whole, the unsharded
    run's profile within 1e-6; a run that crashes at step 13 and resumes from its checkpoint
    at step 10 (the profiles' shards kept with it) saves the same profiles bit for bit; the
    post-hoc tool scores the sharded run's reconstructions as the unsharded run's."""
    from test_lm import lm_run, write_text

    from swa_research.fileio import load_sharded_state

    text = write_text(tmp_path / "t.txt", lines=800)
    args = [*lm_run(text), "trainer.epochs=2", "trainer.posthoc_ema=[0.05,0.1]",
            "trainer.posthoc_ema_every=5"]

    def run(name: str, *more: str) -> Path:
        cfg = compose_config([*args, *more])
        train(cfg, tmp_path / name)
        (tmp_path / name / ".hydra").mkdir(exist_ok=True)
        OmegaConf.save(cfg, tmp_path / name / ".hydra" / "config.yaml")
        return tmp_path / name

    plain, shard = run("plain"), run("fsdp", "trainer.strategy=fsdp")
    crash = StepCrash(monkeypatch, 13)
    with pytest.raises(RuntimeError, match="crash at step 13"):
        run("resumed", "trainer.strategy=fsdp")
    crash.counting()
    resumed = run("resumed", "trainer.strategy=fsdp")
    assert crash.steps == 10  # steps 11..20: resumed from the checkpoint at step 10
    for s in ("0.05", "0.1"):
        folder = f"posthoc_ema/sigma_rel_{s}"
        index = json.loads((shard / folder / "index.json").read_text())
        assert [e["file"] for e in index["snapshots"]] == [f"it{i:06d}" for i in (5, 10, 15, 20)]
        for i in (5, 10, 15, 20):
            want = torch.load(plain / folder / f"it{i:06d}.pt", weights_only=True)["state_dict"]
            got = load_sharded_state(shard / folder / f"it{i:06d}")
            again = load_sharded_state(resumed / folder / f"it{i:06d}")
            assert set(got) == set(want) == set(again)
            for k in want:
                assert (got[k] - want[k]).abs().max().item() <= 1e-6, (s, i, k)
                assert torch.equal(again[k], got[k]), (s, i, k)
    scores = {}
    for d in (plain, shard):
        assert posthoc.main([str(d), "--ema-sigma-rel", "0.03,0.07", "--device", "cpu"]) == 0
        with open(d / "posthoc.csv", newline="") as f:
            scores[d.name] = [(r["sigma_rel"], r["n_points"], float(r["val_loss"]))
                              for r in csv.DictReader(f)]
    assert [r[:2] for r in scores["fsdp"]] == [("0.03", "8"), ("0.07", "8")]
    for a, b in zip(scores["plain"], scores["fsdp"], strict=True):
        assert a[:2] == b[:2] and b[2] == pytest.approx(a[2], abs=1e-5)


def test_the_posthoc_tool_logs_into_the_runs_own_wandb_record(tmp_path: Path) -> None:
    """A run that logged to W&B (offline here): the post-hoc tool resumes its W&B run (the same
    id) and logs the rows, the widths' table, the line plot and the image there, with the best
    width by validation loss (computed here from posthoc.csv) in the summary; --no-wandb and a
    run without W&B leave the W&B record as it was."""
    from test_wandb import read_offline_folder

    run_dir = tmp_path / "run"
    cfg = compose_config([*RUN, "logger=wandb", "logger.mode=offline"])
    train(cfg, run_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    assert posthoc.main([str(run_dir), "--ema-sigma-rel", "0.03,0.05,0.2", "--device", "cpu",
                         "--no-wandb"]) == 0
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert posthoc.main([str(run_dir), "--ema-sigma-rel", "0.03,0.05,0.2",
                         "--device", "cpu"]) == 0
    first, second = sorted((run_dir / "wandb").glob("offline-run-*"))
    trained, logged = read_offline_folder(first), read_offline_folder(second)
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    assert trained["run"]["run_id"] == logged["run"]["run_id"] == run_id
    with open(run_dir / "posthoc.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    best = min(rows, key=lambda r: float(r["val_loss"]))
    assert logged["summary"]["posthoc_ema/best_sigma_rel"] == float(best["sigma_rel"])
    assert logged["summary"]["posthoc_ema/best_val_loss"] == pytest.approx(
        float(best["val_loss"]), rel=1e-9)
    row, = logged["history"]
    keys = {k.split(".")[0] for k in row}
    assert {"posthoc/table", "posthoc_ema/table", "plots/posthoc_ema",
            "posthoc_ema/val_loss_vs_sigma_rel_table"} <= keys, keys
    table = json.loads((second / "files" / row["posthoc_ema/table.path"]).read_text())
    assert table["columns"][:2] == ["sigma_rel", "n_points"] and "val_loss" in table["columns"]
    loss = table["columns"].index("val_loss")
    assert [(r[0], r[loss]) for r in table["data"]] == [
        (float(r["sigma_rel"]), pytest.approx(float(r["val_loss"]), rel=1e-9)) for r in rows]
    assert (second / "files" / "posthoc_ema.png").is_file()


def test_a_resumed_run_continues_its_profiles_and_refuses_new_ones(
        profile_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash at step 8 resumes from the checkpoint at step 6 and saves the uninterrupted
    run's profiles bit for bit; resuming with other widths, or with profiles the checkpoint
    lacks (trainer.resume_override=true), is refused in one line: a profile started midway
    would be saved with wrong times."""
    crash = StepCrash(monkeypatch, 8)
    with pytest.raises(RuntimeError, match="crash at step 8"):
        train(compose_config(RUN), tmp_path / "run")
    crash.counting()
    train(compose_config(RUN), tmp_path / "run")
    assert crash.steps == 6  # steps 7..12
    for s in ("0.05", "0.1"):
        for i in (4, 8, 12):
            name = f"posthoc_ema/sigma_rel_{s}/it{i:06d}.pt"
            a = torch.load(profile_run / name)["state_dict"]
            b = torch.load(tmp_path / "run" / name)["state_dict"]
            assert all(torch.equal(a[k], b[k]) for k in a), name

    plain = [x for x in RUN if not x.startswith("trainer.posthoc_ema")]
    for name, first, then, message in [
            ("other", RUN, [*RUN, "trainer.posthoc_ema=[0.05,0.2]"],
             r"profiles of sigma_rel \['0.05', '0.2'\] \(trainer.posthoc_ema\), the checkpoint "
             r"at iteration 6 holds \['0.05', '0.1'\]"),
            ("new", plain, RUN, r"the checkpoint at iteration 6 holds none; a profile's time")]:
        crash.again()  # a checkpoint at step 6, then the crash
        with pytest.raises(RuntimeError, match="crash at step 8"):
            train(compose_config(first), tmp_path / name)
        crash.counting()
        with pytest.raises(UserError, match=message):
            train(compose_config([*then, "trainer.resume_override=true"]), tmp_path / name)


def test_an_unreachable_wandb_gets_an_offline_record_without_waiting_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A run that logged online (its W&B unreachable now): the post-hoc tool tries online once
    within the run's logger.init_timeout, then writes an offline record of the same run id with
    its wandb sync command in one warning; the next call in the process goes offline at once."""
    import logging

    from test_wandb import unreachable_wandb

    from swa_research.analysis import posthoc_wandb
    from swa_research.tracking import loggers

    monkeypatch.setattr(loggers, "api_key_configured", lambda: False)  # training: offline
    run_dir = tmp_path / "run"
    cfg = compose_config([*RUN, "logger=wandb", "logger.mode=online", "logger.init_timeout=7"])
    train(cfg, run_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    modes = unreachable_wandb(monkeypatch)
    monkeypatch.setattr(posthoc_wandb, "_UNREACHABLE", [False])
    caplog.set_level(logging.WARNING, logger="swa_research.analysis.posthoc_wandb")
    for _ in range(2):
        assert posthoc.main([str(run_dir), "--ema-sigma-rel", "0.07", "--device", "cpu"]) == 0
    assert modes == [("online", 7.0), ("offline", 300.0), ("offline", 7.0)]
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "swa_research.analysis.posthoc_wandb"]
    assert len(warnings) == 1 and "could not reach W&B" in warnings[0], warnings
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 3 and f"wandb sync {folders[1]}" in warnings[0]
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    assert all(f"-{run_id}" in f.name for f in folders), (run_id, folders)  # (-1: same second)
