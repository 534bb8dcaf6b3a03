"""Averages of a model sharded with FSDP2 (swa_research/averaging/sharded.py): each rank's shard
averaged locally, equal to the unsharded average; evaluated through the model with its own
weights restored bit for bit; examples/fsdp_loop.py on two CPU processes against one."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from swa_research.averaging import make_average, predict, update_bn

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fsdp_loop.py"


@pytest.fixture
def one_rank(tmp_path: Path) -> Iterator[None]:
    """A process group of one (gloo) in this process: fully_shard works on it."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 12), nn.GELU(),
                         nn.Linear(12, 3))


def sharded(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for i in (0, 2, 4):
        fully_shard(model[i])
    return fully_shard(model)


def steps(model: nn.Module, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(n):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize(("method", "options"), [("swa", {}), ("ema", {"decay": 0.8}),
                                                 ("ema", {"decay": 0.9, "ema_warmup": True}),
                                                 ("lawa", {"lawa_k": 3}),
                                                 ("power_ema", {"sigma_rel": 0.05})])
def test_a_sharded_average_equals_the_unsharded_one(one_rank: None, method: str,
                                                    options: dict) -> None:
    plain, shard = net(), sharded(net())
    ref, avg = make_average(method, plain, **options), make_average(method, shard, **options)
    assert getattr(avg, "sharded", False) and not getattr(ref, "sharded", False)
    for i in range(5):
        steps(plain, 3, seed=i)
        steps(shard, 3, seed=i)
        ref.update(plain)
        avg.update(shard)
    full = avg.full_state_dict()
    for name, p in ref.module.named_parameters():
        torch.testing.assert_close(full[name], p.detach(), rtol=0, atol=1e-6)
    assert avg.n_averaged == ref.n_averaged == (3 if method == "lawa" else 5)
    assert avg.nbytes() == ref.nbytes() - sum(b.numel() * b.element_size()
                                              for b in ref.module.buffers())
    # Evaluated through the model: the average's predictions, the model's weights kept.
    before = {n: p.to_local().clone() for n, p in shard.named_parameters()}
    x = torch.randn(32, 6)
    logits, _ = predict(avg, [(x, torch.zeros(32, dtype=torch.int64))])
    torch.testing.assert_close(logits, predict(ref, [x])[0], rtol=0, atol=1e-5)
    for n, p in shard.named_parameters():
        assert torch.equal(p.to_local(), before[n])
    # Its state goes back into a fresh average of the same model.
    again = make_average(method, shard, **options)
    again.load_state_dict(copy.copy(avg.state_dict()))
    assert again.n_averaged == avg.n_averaged
    for name, t in again.full_state_dict().items():
        assert torch.equal(t, full[name])
    if method == "lawa":  # the ring continues: the next point drops the oldest
        steps(plain, 1, seed=9)
        steps(shard, 1, seed=9)
        ref.update(plain)
        again.update(shard)
        for name, p in ref.module.named_parameters():
            torch.testing.assert_close(again.full_state_dict()[name], p.detach(), rtol=0,
                                       atol=1e-6)


def test_what_a_sharded_average_refuses(one_rank: None) -> None:
    model = sharded(net())
    for method in ("fge", "swag"):
        with pytest.raises(ValueError, match="has no network of its own"):
            _ = make_average(method, model).module
    avg = make_average("swa", model)
    with pytest.raises(ValueError, match="has no network of its own"):
        _ = avg.module
    with pytest.raises(ValueError, match=r"^the state is of a swa average and cannot be loaded "
                                         "into a ema average"):
        make_average("ema", model).load_state_dict(avg.state_dict())
    avg.update(model)
    update_bn(avg, [torch.randn(4, 6)])  # no BN: nothing to do, the weights untouched
    from torch.distributed.fsdp import fully_shard

    bn = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    fully_shard(bn)
    with pytest.raises(ValueError, match="a model with batch norm cannot be averaged sharded"):
        make_average("swa", bn)


@pytest.mark.slow
def test_the_fsdp_example_on_two_processes_equals_one_unsharded(tmp_path: Path) -> None:
    """Two ranks with every average sharded against one process without FSDP: the same SGD
    and averaged weights within 1e-5; each rank holds about half of an average's bytes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", str(EXAMPLE), "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(EXAMPLE), "--no-shard", "--out",
                          str(tmp_path / "one")], capture_output=True, text=True, timeout=600,
                         env=env, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    a = torch.load(tmp_path / "two", weights_only=True)["weights"]
    b = torch.load(tmp_path / "one", weights_only=True)["weights"]
    assert set(a) == set(b) == {"sgd", "ema", "swa", "lawa"}
    for kind in a:
        for name in b[kind]:
            torch.testing.assert_close(a[kind][name], b[kind][name], rtol=0, atol=1e-5)
    assert not torch.equal(a["ema"]["0.weight"], a["sgd"]["0.weight"])
    whole = torch.load(str(tmp_path / "one") + ".rank0.bytes", weights_only=True)
    ranks = [torch.load(str(tmp_path / "two") + f".rank{r}.bytes", weights_only=True)
             for r in (0, 1)]
    for kind, n in whole.items():
        assert ranks[0][kind] + ranks[1][kind] == n
        assert max(r[kind] for r in ranks) <= 0.51 * n
    assert "ema   test accuracy" in two.stdout


@pytest.mark.slow
def test_trainer_fsdp_on_two_ranks_equals_one_process(tmp_path: Path) -> None:
    """trainer.strategy=fsdp with torchrun on 2 ranks against DDP on 2 ranks and one process,
    a GPT without dropout on a text that it learns, 50 steps: the SGD model, SWA, EMA and LAWA
    within 1e-5 (whole weight files, gathered tensor by tensor), the same validation and test
    losses, each average's bytes on a rank about half of the whole, and the post-hoc EMA
    profiles (each rank its shards) the unsharded run's within 1e-6."""
    import json

    from test_lm import lm_run, write_text

    text = write_text(tmp_path / "t.txt", lines=800)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    args = [*lm_run(text), "trainer.epochs=5", "swa.also=[ema,lawa]", "swa.lawa_k=2",
            "trainer.posthoc_ema=[0.05,0.1]", "trainer.posthoc_ema_every=20"]
    one = subprocess.run([sys.executable, "-m", "swa_research.train", *args,
                          f"hydra.run.dir={tmp_path / 'one'}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "swa_research.train", *args,
                          "trainer.strategy=fsdp", "trainer.snapshot_every=5",
                          "trainer.snapshot_unit=iter", f"hydra.run.dir={tmp_path / 'two'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-4000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "swa_research.train", *args,
                          "trainer.strategy=ddp", f"hydra.run.dir={tmp_path / 'ddp'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    m1, m2, m3 = (json.loads((tmp_path / d / "metrics.json").read_text())
                  for d in ("one", "two", "ddp"))
    assert m1["train"]["iterations"] == 50
    assert m1["sgd"]["val_loss"] < 0.7 * 2.83  # it learned (ln 17 = 2.83)
    for other in (m2, m3):
        for name in ("sgd", "swa", "ema", "lawa"):
            for key in ("val_loss", "test_loss"):
                assert other[name][key] == pytest.approx(m1[name][key], abs=1e-5), (name, key)
    for name in ("sgd_final.pt", "sgd_best_val.pt", "swa.pt", "ema.pt", "lawa.pt"):
        a = torch.load(tmp_path / "one" / name, weights_only=True)["state_dict"]
        for run in ("two", "ddp"):
            b = torch.load(tmp_path / run / name, weights_only=True)["state_dict"]
            assert set(a) == set(b) and all(type(t) is torch.Tensor for t in b.values())
            worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
            assert worst < 1e-5, (run, name, worst)
    for name, sizes in m2["train"]["average_bytes"].items():
        assert 0.45 * sizes["whole"] <= sizes["this_rank"] <= 0.55 * sizes["whole"], name
    assert "FSDP: 2 ranks, global batch 32" in (tmp_path / "two" / "train.log").read_text()
    # The snapshots both ranks wrote, read whole in this process: the post-hoc SWA over the
    # online SWA's points is the online one.
    from swa_research.analysis.posthoc import PosthocRun, Setting

    ph = PosthocRun(tmp_path / "two", torch.device("cpu"))
    shards = sorted((tmp_path / "two" / "trajectory" / "it000050").glob("*.distcp"))
    assert len(shards) == 2, shards  # one file of shards per rank
    online = torch.load(tmp_path / "two" / "swa.pt", weights_only=True)
    points = [e for e in ph.index["snapshots"] if e["iteration"] > 25]  # swa.start=0.5
    assert len(points) == online["n_averaged"] == m2["swa"]["n_averaged"]
    module = ph.average(Setting("swa", start=30, freq=5, window=0), points)
    online = online["state_dict"]
    for k, v in module.state_dict().items():
        assert (v - online[k]).abs().max().item() <= 1e-6, k
    from swa_research.fileio import load_sharded_state

    for s in ("0.05", "0.1"):
        for i in (20, 40, 50):
            name = f"posthoc_ema/sigma_rel_{s}/it{i:06d}"
            want = torch.load(tmp_path / "one" / f"{name}.pt", weights_only=True)["state_dict"]
            assert len(list((tmp_path / "two" / name).glob("*.distcp"))) == 2  # a file a rank
            got = load_sharded_state(tmp_path / "two" / name)
            assert set(got) == set(want)
            assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-6, name


def test_fsdp_is_refused_where_it_is_not_built_yet() -> None:
    from conftest import compose_config

    from swa_research.config import UserError
    from swa_research.training.build import load_config
    from swa_research.training.fsdp import check_fsdp

    c = load_config(compose_config(["trainer.strategy=fsdp", "swa=fge", "schedule=fge",
                                    "optimizer=adamw_schedulefree"]))
    with pytest.raises(UserError, match=r"^trainer.strategy=fsdp: not supported yet with "
                                        r"optimizer=adamw_schedulefree$"):
        check_fsdp(c)
    check_fsdp(load_config(compose_config(["trainer.strategy=fsdp",
                                           "swa.also=[ema,lawa,swag,swag_diag]"])))


def test_shard_model_wraps_the_blocks_and_refuses_batch_norm(one_rank: None) -> None:
    from swa_research.averaging.sharded import is_sharded
    from swa_research.config import UserError
    from swa_research.models import build_model, resolve_model_config
    from swa_research.training.fsdp import shard_model

    cpu = torch.device("cpu")
    gpt = build_model(resolve_model_config({"name": "gpt", "n_layer": 2, "n_head": 2,
                                            "n_embd": 16, "block_size": 8}), 11, 8)
    shard_model(gpt, "gpt", [], True, cpu)
    assert is_sharded(gpt) and type(gpt.h[0]).__name__.startswith("FSDP")
    with pytest.raises(UserError, match=r"^trainer.fsdp.wrap=\['Nope'\]: no module of "
                                        r"model=mlp is of these classes; name the blocks"):
        shard_model(net(), "mlp", ["Nope"], True, cpu)
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(UserError, match=r"^trainer.strategy=fsdp: model=vgg11 has batch norm"):
        shard_model(bn, "vgg11", ["Linear"], True, cpu)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3)).to(memory_format=torch.channels_last)
    with pytest.raises(UserError, match=r"FSDP shards contiguous parameters only.*set "
                                        r"trainer.channels_last=false$"):
        shard_model(conv, "vgg11", ["Conv2d"], True, cpu)


@pytest.mark.slow
def test_a_killed_fsdp_run_resumes_bit_exact_from_its_sharded_checkpoint(tmp_path: Path) -> None:
    """Under trainer.strategy=fsdp the sharded parts of a checkpoint are written with
    torch.distributed.checkpoint, each rank its shards. SIGKILL of both ranks mid-epoch, of
    rank 0 while it writes checkpoint.pt (after the shards), and of rank 1 alone: each rerun
    resumes and ends with the uninterrupted run's weights and metrics bit for bit; no shard
    folder is left; a resume under another strategy is refused in one line."""
    import json

    from conftest import fault_env
    from test_lm import lm_run, write_text

    text = write_text(tmp_path / "t.txt", lines=800)
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    base.update(OMP_NUM_THREADS="1")
    args = [*lm_run(text), "trainer.epochs=2", "swa.also=[ema,lawa]", "swa.lawa_k=2",
            "trainer.deterministic=true", "trainer.strategy=fsdp"]

    def torchrun(run_dir: Path, fault: str | None = None, rank: str | None = None,
                 extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        env = {**base, **fault_env(fault)}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        if rank is not None:
            env["SWA_RESEARCH_FAULT_RANK"] = rank
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc-per-node", "2", "-m", "swa_research.train", *args,
                               *extra, f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)

    whole = torchrun(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    for label, fault, rank in (("mid_epoch", "step@15", None),
                               ("writing", "checkpoint_write@2", "0"),
                               ("one_rank", "step@13", "1")):
        run_dir = tmp_path / label
        killed = torchrun(run_dir, fault, rank)
        assert killed.returncode != 0, label
        if label == "mid_epoch":
            refused = torchrun(run_dir, extra=("trainer.strategy=ddp",))
            assert refused.returncode != 0  # torchrun's own status for a child's 2
            assert "cannot resume: the checkpoint was written under trainer.strategy=fsdp" \
                in refused.stderr
        resumed = torchrun(run_dir)
        assert resumed.returncode == 0, (label, resumed.stderr[-3000:])
        a, b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "whole",
                                                                        run_dir))
        for name in ("sgd", "swa", "ema", "lawa"):
            assert a[name] == b[name], (label, name)
        for name in ("sgd_final.pt", "sgd_best_val.pt", "swa.pt", "ema.pt", "lawa.pt"):
            wa = torch.load(tmp_path / "whole" / name, weights_only=True)["state_dict"]
            wb = torch.load(run_dir / name, weights_only=True)["state_dict"]
            assert all(torch.equal(wa[k], wb[k]) for k in wa), (label, name)
        assert not list(run_dir.glob(".shards.*")), label


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_on_another_number_of_ranks(tmp_path: Path) -> None:
    """A 2-rank FSDP run killed mid-epoch resumes in one process (FSDP over one rank:
    torch.distributed.checkpoint reshards the model, the optimizer and every average), and a
    one-process FSDP run resumes on 2 ranks: both end within 1e-5 of the uninterrupted 2-rank
    run, weights and metrics (the ranks' reductions differ in order, so not bit for bit)."""
    import json

    from conftest import fault_env
    from test_lm import lm_run, write_text

    text = write_text(tmp_path / "t.txt", lines=800)
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    base.update(OMP_NUM_THREADS="1")
    args = [*lm_run(text), "trainer.epochs=2", "swa.also=[ema,lawa]", "swa.lawa_k=2",
            "trainer.strategy=fsdp"]

    def run(run_dir: Path, ranks: int, fault: str | None = None
            ) -> subprocess.CompletedProcess:
        env = {**base, **fault_env(fault)}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                  str(ranks)] if ranks > 1 else []
        return subprocess.run([sys.executable, *launch, "-m", "swa_research.train", *args,
                               f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)

    whole = run(tmp_path / "whole", 2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    for label, first, then in (("two_then_one", 2, 1), ("one_then_two", 1, 2)):
        run_dir = tmp_path / label
        killed = run(run_dir, first, "step@15")
        assert killed.returncode != 0, label
        assert list(run_dir.glob(".shards.it*")), label  # the epoch-1 checkpoint's shards
        resumed = run(run_dir, then)
        assert resumed.returncode == 0, (label, resumed.stderr[-3000:])
        assert "resuming from" in (run_dir / "train.log").read_text(), label
        b = json.loads((run_dir / "metrics.json").read_text())
        for name in ("sgd", "swa", "ema", "lawa"):
            for key in ("val_loss", "test_loss"):
                assert b[name][key] == pytest.approx(a[name][key], abs=1e-5), (label, name, key)
            assert b[name].get("n_averaged") == a[name].get("n_averaged"), (label, name)
        for name in ("sgd_final.pt", "swa.pt", "ema.pt", "lawa.pt"):
            wa = torch.load(tmp_path / "whole" / name, weights_only=True)["state_dict"]
            wb = torch.load(run_dir / name, weights_only=True)["state_dict"]
            worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
            assert worst < 1e-5, (label, name, worst)


def test_sharded_snapshots_are_read_whole_by_posthoc(tmp_path: Path) -> None:
    """Under trainer.strategy=fsdp (here over one rank) each snapshot is a
    torch.distributed.checkpoint folder; python -m swa_research.posthoc reads it whole in one
    process: the post-hoc SWA over the online SWA's points is the online swa.pt within 1e-6,
    and its row scores what metrics.json scores. A resume's prepare removes the folders after
    its checkpoint and the half-written ones."""
    import csv
    import json

    from conftest import compose_config
    from omegaconf import OmegaConf
    from test_lm import lm_run, write_text

    from swa_research.analysis.posthoc import PosthocRun, Setting, main
    from swa_research.config import TrainerConfig
    from swa_research.fileio import load_sharded_state
    from swa_research.training.build import train
    from swa_research.training.snapshots import SnapshotWriter

    text = write_text(tmp_path / "t.txt", lines=800)
    run_dir = tmp_path / "run"
    cfg = compose_config([*lm_run(text), "trainer.epochs=2", "trainer.strategy=fsdp",
                          "trainer.snapshot_every=5", "trainer.snapshot_unit=iter"])
    train(cfg, run_dir)
    assert not dist.is_initialized()  # the group of one is gone with the run
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    index = json.loads((run_dir / "trajectory" / "index.json").read_text())
    assert [e["file"] for e in index["snapshots"]] == [f"it{i:06d}" for i in (5, 10, 15, 20)]
    assert (run_dir / "trajectory" / "it000020" / ".metadata").is_file()
    final = torch.load(run_dir / "sgd_final.pt", weights_only=True)["state_dict"]
    last = load_sharded_state(run_dir / "trajectory" / "it000020")
    assert set(last) == set(final) and all(torch.equal(last[k], final[k]) for k in final)
    online = torch.load(run_dir / "swa.pt", weights_only=True)
    assert online["n_averaged"] == 2  # after iterations 15 and 20
    ph = PosthocRun(run_dir, torch.device("cpu"))
    module = ph.average(Setting("swa", start=15, freq=5, window=0),
                        [e for e in ph.index["snapshots"] if e["iteration"] >= 15])
    for k, v in module.state_dict().items():
        assert (v - online["state_dict"][k]).abs().max().item() <= 1e-6, k
    assert main([str(run_dir), "--swa-start", "15", "--device", "cpu"]) == 0
    with open(run_dir / "posthoc.csv", newline="") as f:
        row, = (r for r in csv.DictReader(f) if r["kind"] == "swa")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert float(row["test_loss"]) == pytest.approx(metrics["swa"]["test_loss"], abs=1e-6)

    trainer_cfg = TrainerConfig(epochs=2, snapshot_every=5, snapshot_unit="iter")
    (run_dir / "trajectory" / ".it000025.tmp").mkdir()  # a write a kill interrupted
    writer = SnapshotWriter(run_dir, trainer_cfg, 10, sharded=True)
    writer.prepare(nn.Linear(2, 2), 10)  # resuming from the checkpoint at iteration 10
    kept = sorted(p.name for p in (run_dir / "trajectory").iterdir())
    assert kept == ["index.json", "it000005", "it000010"]


def test_the_memory_table_is_the_shapes_bytes_over_the_ranks(tmp_path: Path) -> None:
    """scripts/fsdp_memory.py: GPT-2 small without biases, its vocabulary padded to 50,304
    (nanoGPT's train_gpt2 shape): 124,373,760 parameters, counted here by hand, at 4 bytes,
    1/8 of them a rank on 8 ranks; AdamW twice that; offloaded averages leave the GPU column;
    a run's measured share is printed."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("fsdp_memory", ROOT / "scripts" /
                                                  "fsdp_memory.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fsdp_memory"] = mod  # its dataclass looks its module up
    spec.loader.exec_module(mod)
    small = mod.count("gpt2-small")
    d, layers = 768, 12  # token and position embeddings, the blocks, the final LayerNorm
    assert small.parameters == 50304 * d + 1024 * d + layers * (12 * d * d + 2 * d) + d
    assert small.block == 12 * 768 * 768 + 2 * 768  # attention, MLP, two LayerNorm weights
    r = mod.per_rank(small, 8, averages=2, lawa_k=0, offload=False)
    assert r["weights"] == r["gradients"] == small.parameters * 4 / 8
    assert r["adamw"] == 2 * r["weights"] and r["averages"] == 2 * r["weights"]
    off = mod.per_rank(small, 8, averages=2, lawa_k=3, offload=True)
    assert off["averages"] == 0 and off["host"] == 5 * r["weights"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"train": {"average_bytes": {
        "swa": {"this_rank": 50, "whole": 100}}}}))
    assert "swa: 50 of 100 bytes (0.500 of the whole)" in mod.measured(run)
    assert mod.main(["--models", "gpt2-small", "--ranks", "8"]) == 0
    with pytest.raises(SystemExit):
        mod.main(["--models", "gpt5"])


@pytest.mark.slow
def test_sharded_swag_equals_one_process(tmp_path: Path) -> None:
    """SWAG, SWAG-Diagonal (and FGE) of a fully_shard'ed MLP on 2 ranks (one layer split unevenly)
    against the same averages of the model whole, fed the same 7 points
    (tests/sharded_swag_worker.py): each rank's slice of a sample is the one-process sample's
    for the same seed, the Bayesian model average through the sharded model is one process's,
    the model's own weights come back bit for bit, swag.pt's state dict and posterior gathered
    whole are one process's, a torch.distributed.checkpoint round trip resumes exactly, and a
    rank holds about half of the moments."""
    import json

    out = tmp_path / "worst.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(ROOT / "tests" / "sharded_swag_worker.py"),
                           str(out), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = json.loads(out.read_text())
    for method in ("swag", "swag_diag"):
        for key in ("sample", "bma", "state_dict", "export", "resumed"):
            assert worst[f"{method}.{key}"] <= 1e-6, (method, key, worst)
    for key in ("probs", "predict", "members", "resumed"):
        assert worst[f"fge.{key}"] <= 1e-6, (key, worst)
    for key in ("eval.loss.5", "eval.acc.5", "eval.loss.6", "eval.acc.6"):  # split, padded
        assert worst[key] <= 1e-6, (key, worst)
    for method in ("swag", "swag_diag", "fge"):
        assert worst[f"{method}.restored"] == 0.0
        assert 0.45 <= worst[f"{method}.bytes_share"] <= 0.55


@pytest.mark.slow
def test_trainer_swag_and_fge_under_fsdp_equal_one_process_and_resume(tmp_path: Path) -> None:
    """trainer.strategy=fsdp with FGE, SWAG and SWAG-Diagonal beside SWA (schedule=fge), a
    BN-free image model on 2 ranks, against one process: the SGD model, SWA, the ensemble and
    both Bayesian model averages within 1e-5 (the samples are the same numbers), swag.pt's
    weights and posterior and fge.pt's members gathered whole; killed mid-run and rerun, the
    2-rank run resumes from its sharded checkpoint to the same numbers."""
    import json

    from conftest import TINY, fault_env

    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    base.update(OMP_NUM_THREADS="1")
    args = [*TINY, "model=vgg11", "model.width=0.125", "model.batch_norm=false",
            "model.dropout=0", "optimizer=sgd", "optimizer.momentum=0.9", "optimizer.lr=0.01",
            "data.augment=none", "trainer.epochs=4", "swa=fge",
            "swa.also=[fge,swag,swag_diag]", "swa.start=2", "swa.freq=1", "swa.samples=3",
            "schedule.fge_cycle=2",
            "trainer.channels_last=false", "trainer.deterministic=true"]

    def run(run_dir: Path, ranks: int, fault: str | None = None
            ) -> subprocess.CompletedProcess:
        env = {**base, **fault_env(fault)}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        launch = (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
                  if ranks > 1 else [])
        extra = ["trainer.strategy=fsdp", "trainer.fsdp.wrap=[Conv2d]"] if ranks > 1 else []
        return subprocess.run([sys.executable, *launch, "-m", "swa_research.train", *args,
                               *extra, f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)

    one = run(tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    for name in ("sgd", "swa", "fge", "swag", "swag_diag"):
        assert m2[name]["n_averaged" if name != "sgd" else "test_acc"] == \
            m1[name]["n_averaged" if name != "sgd" else "test_acc"], name
        for key in ("val_loss", "test_loss"):
            assert m2[name][key] == pytest.approx(m1[name][key], abs=1e-5), (name, key)
    a = torch.load(tmp_path / "one" / "swag.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "swag.pt", weights_only=True)
    for k in a["state_dict"]:
        assert (a["state_dict"][k] - b["state_dict"][k]).abs().max().item() < 1e-5, k
    for k in ("mean", "sq_mean", "deviations"):
        assert a["swag"][k].shape == b["swag"][k].shape
        assert (a["swag"][k] - b["swag"][k]).abs().max().item() < 1e-5, k
    a = torch.load(tmp_path / "one" / "fge.pt", weights_only=True)["members"]
    b = torch.load(tmp_path / "two" / "fge.pt", weights_only=True)["members"]
    assert len(a) == len(b) == m1["fge"]["n_averaged"] >= 1
    for ma, mb in zip(a, b, strict=True):
        assert all((ma[k] - mb[k]).abs().max().item() < 1e-5 for k in ma)
    killed = run(tmp_path / "killed", 2, "step@10")  # in epoch 4 of 3 steps each
    assert killed.returncode != 0
    resumed = run(tmp_path / "killed", 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in (tmp_path / "killed" / "train.log").read_text()
    m3 = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    for name in ("sgd", "swa", "fge", "swag", "swag_diag"):
        assert m3[name] == m2[name], name


def test_final_weights_as_sharded_folders(tmp_path: Path) -> None:
    """trainer.fsdp.final_format=dcp (here FSDP over one rank): every weight file is a
    torch.distributed.checkpoint folder NAME.dcp with info.pt, listed in metrics.json; read
    whole in one process it equals what the whole format writes (a second run, same seed), and
    the readers take it: trainer.init_weights, the ensemble tool's loader, a finished run's
    check. Without FSDP the key is refused in one line."""
    import json

    from conftest import compose_config
    from omegaconf import OmegaConf
    from test_lm import lm_run, write_text

    from swa_research.analysis.ensemble import Combiner
    from swa_research.config import UserError
    from swa_research.fileio import read_weights, weights_location
    from swa_research.training.build import load_config, load_init_weights, train
    from swa_research.training.fsdp import check_fsdp

    text = write_text(tmp_path / "t.txt", lines=800)
    base = [*lm_run(text), "trainer.epochs=2", "swa.also=[ema]", "trainer.strategy=fsdp"]
    runs = {}
    for fmt in ("dcp", "whole"):
        cfg = compose_config([*base, f"trainer.fsdp.final_format={fmt}"])
        runs[fmt] = tmp_path / fmt
        train(cfg, runs[fmt])
        (runs[fmt] / ".hydra").mkdir()
        OmegaConf.save(cfg, runs[fmt] / ".hydra" / "config.yaml")
    names = ["sgd_final", "sgd_best_val", "swa", "ema"]
    metrics = json.loads((runs["dcp"] / "metrics.json").read_text())
    assert metrics["files"] == [f"{n}.dcp" for n in names]
    for n in names:
        folder = runs["dcp"] / f"{n}.dcp"
        assert (folder / ".metadata").is_file() and (folder / "info.pt").is_file()
        assert weights_location(runs["dcp"] / f"{n}.pt") == folder
        a, b = read_weights(runs["dcp"] / f"{n}.pt"), read_weights(runs["whole"] / f"{n}.pt")
        assert set(a) == set(b) and a.get("n_averaged") == b.get("n_averaged")
        assert set(a["state_dict"]) == set(b["state_dict"])
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    with pytest.raises(UserError, match="already holds a finished run"):
        train(compose_config([*base, "trainer.fsdp.final_format=dcp"]), runs["dcp"])
    combiner = Combiner([runs["dcp"]], torch.device("cpu"))
    state, = combiner.load(runs["dcp"], "swa")
    swa = read_weights(runs["whole"] / "swa.pt")["state_dict"]
    assert all(torch.equal(state[k], swa[k]) for k in swa)
    model = copy.deepcopy(combiner.base.model)
    load_init_weights(model, str(runs["dcp"] / "ema.dcp"))
    ema = read_weights(runs["whole"] / "ema.pt")["state_dict"]
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match=r"^trainer.fsdp.final_format=dcp writes a sharded "
                                        r"model's weights rank by rank: it needs "
                                        r"trainer.strategy=fsdp$"):
        check_fsdp(load_config(compose_config(["trainer.fsdp.final_format=dcp"])))


@pytest.mark.parametrize(("method", "options"), [("swa", {}), ("ema", {"decay": 0.8}),
                                                 ("lawa", {"lawa_k": 3})])
def test_an_offloaded_average_equals_the_one_beside_the_model(one_rank: None, method: str,
                                                              options: dict) -> None:
    """offload=True: the average in host memory, each point staged and averaged in at the next
    update or read; after every update and at the end it equals the average kept beside the
    model, also read in the middle of the run (a swap, a sharded checkpoint's round trip)."""
    import torch.distributed.checkpoint as dcp

    from swa_research.averaging import predict

    model = sharded(net())
    near = make_average(method, model, **options)
    far = make_average(method, model, offload=True, **options)
    assert far.settings().get("offload") == "cpu" and "offload" not in far.state_settings()
    x = torch.randn(5, 6)
    for i in range(7):
        steps(model, 2, seed=i)
        near.update(model)
        far.update(model)
        assert far.n_averaged == near.n_averaged
        if i == 3:  # read in the middle: the staged point is averaged in first
            a, _ = predict(near, [x])
            b, _ = predict(far, [x])
            assert torch.equal(a, b)
    a, b = near.full_state_dict(), far.full_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(_local_of(w).device.type == "cpu" for w in far.weights.values())
    state = far.tensors()
    meta = far.meta()
    again = make_average(method, model, offload=True, **options)
    again.load_meta(meta)
    with tempfile.TemporaryDirectory() as d:
        dcp.save({"a": state}, checkpoint_id=d)
        dcp.load({"a": again.tensors(meta["ring"])}, checkpoint_id=d)
    for avg in (near, again):
        avg.update(model)
    a, b = near.full_state_dict(), again.full_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _local_of(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def test_offload_is_refused_where_it_does_not_apply(one_rank: None) -> None:
    from conftest import compose_config

    from swa_research.config import UserError
    from swa_research.training.build import load_config
    from swa_research.training.fsdp import check_fsdp

    with pytest.raises(UserError, match=r"^swa.offload=cpu \(averages swa\): host memory "
                                        r"holds a sharded model's averages; it needs "
                                        r"trainer.strategy=fsdp$"):
        check_fsdp(load_config(compose_config(["swa.offload=cpu"])))
    with pytest.raises(UserError, match=r"swa.offload=cpu for swag \(host memory takes swa, "
                                        r"ema, lawa, power_ema averages\)"):
        check_fsdp(load_config(compose_config(["trainer.strategy=fsdp", "swa=swag",
                                               "swa.offload=cpu"])))
    with pytest.raises(ValueError, match=r"^offload=True keeps a sharded model's average"):
        make_average("ema", net(), offload=True)
    with pytest.raises(ValueError, match=r"^offload: swag's state is not kept in host memory"):
        make_average("swag", sharded(net()), offload=True)


def test_a_run_with_offloaded_averages_equals_one_without(tmp_path: Path) -> None:
    """swa.offload=cpu under trainer.strategy=fsdp (one rank here): SWA, EMA and LAWA held in
    host memory give the run's numbers and weight files bit for bit, and say so in
    metrics.json."""
    import json

    from conftest import compose_config
    from test_lm import lm_run, write_text

    from swa_research.training.build import train

    text = write_text(tmp_path / "t.txt", lines=800)
    base = [*lm_run(text), "trainer.epochs=2", "swa.also=[ema,lawa]", "swa.lawa_k=2",
            "trainer.strategy=fsdp"]
    for name, extra in (("near", []), ("far", ["swa.offload=cpu"])):
        train(compose_config([*base, *extra]), tmp_path / name)
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("near", "far"))
    for name in ("sgd", "swa", "ema", "lawa"):
        assert {k: v for k, v in b[name].items() if k != "offload"} == a[name], name
    assert b["swa"]["offload"] == "cpu" and "offload" not in a["swa"]
    for name in ("swa.pt", "ema.pt", "lawa.pt"):
        wa = torch.load(tmp_path / "near" / name, weights_only=True)["state_dict"]
        wb = torch.load(tmp_path / "far" / name, weights_only=True)["state_dict"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_teardown_frees_the_sharded_model_before_the_interpreter_exits(
        tmp_path: Path) -> None:
    """A sharded model outlives its last reference in reference cycles that hold the device
    mesh and its process group; leaving the group (distributed.teardown, and the group of one
    an in-process run shards over) collects them while the interpreter is whole (left to the
    exit, their destruction aborted a rank now and then under load)."""
    import gc

    from conftest import compose_config
    from test_lm import lm_run, write_text
    from torch.distributed.fsdp import FSDPModule

    from swa_research import distributed
    from swa_research.training.build import train

    def alive() -> int:
        return sum(isinstance(o, FSDPModule) for o in gc.get_objects())

    text = write_text(tmp_path / "t.txt", lines=800)
    enabled = gc.isenabled()
    gc.disable()
    try:
        with distributed.group_of_one():
            model = sharded(net())
            del model
            assert alive() == 4  # the root and its three blocks, kept by their cycles
            distributed.teardown()
            assert alive() == 0
        train(compose_config([*lm_run(text), "trainer.epochs=1", "trainer.strategy=fsdp"]),
              tmp_path / "run")
        assert alive() == 0
    finally:
        if enabled:
            gc.enable()
