"""Language models (task=lm): the GPT, text tokenized into a memory-mapped token file, random
windows that a resume draws again, and a tiny GPT that learns through the whole framework."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF_DIR, compose_config, fault_env
from omegaconf import OmegaConf

from swa_research.analysis.posthoc import main as posthoc_main
from swa_research.config import UserError
from swa_research.data.text import TokenSet, load_tokens, token_paths
from swa_research.errors import DataError
from swa_research.models import build_model, resolve_model_config
from swa_research.tasks import build_task
from swa_research.training.build import load_config, train

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "and", "a", "big", "red", "sun"]


def write_text(path: Path, lines: int = 3000, seed: int = 0) -> Path:
    """Generated sentences of a 13-word vocabulary: learnable structure, 17 characters."""
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
                              + "." for _ in range(lines)))
    return path


def lm_run(root: Path) -> list[str]:
    """lm/char_cpu, small, with its budget and cadences in epochs (trainer.epochs=N after it)."""
    return ["experiment=lm/char_cpu", f"data.root={root}", "model.n_layer=2", "model.n_head=2",
            "model.n_embd=32", "model.block_size=32", "data.windows_per_epoch=320",
            "data.eval_tokens=4096", "trainer.epochs=4", "trainer.max_steps=0",
            "trainer.eval_every_steps=0", "trainer.checkpoint_every_steps=0", "trainer.device=cpu",
            "trainer.progress=none", "swa.start=0.5", "swa.freq=5", "optimizer.lr=3e-3",
            "swa.lr=3e-3"]


def test_gpt2_small_has_nanogpts_parameter_count() -> None:
    """124,439,808 with the tied embedding; nanoGPT prints 123.65M, which leaves out the
    1024 x 768 position embeddings."""
    cfg = resolve_model_config({"name": "gpt", "n_layer": 12, "n_head": 12, "n_embd": 768,
                                "block_size": 1024, "dropout": 0.0, "bias": True})
    with torch.device("meta"):
        model = build_model(cfg, 50257)
    n = sum(p.numel() for p in model.parameters())
    assert n == 124_439_808
    assert round((n - 1024 * 768) / 1e6, 2) == 123.65
    assert model.lm_head.weight is model.wte.weight  # tied
    padded = resolve_model_config({**cfg, "vocab_multiple": 64})
    with torch.device("meta"):
        assert build_model(padded, 50257).wte.weight.shape == (50304, 768)  # nanoGPT's
    with pytest.raises(UserError, match="model.n_embd=100 must be a multiple of model.n_head=3"):
        resolve_model_config({"name": "gpt", "n_embd": 100, "n_head": 3})


def test_the_token_file_is_made_once_rebuilt_on_change_and_refused_when_corrupt(
        tmp_path: Path) -> None:
    text = write_text(tmp_path / "corpus.txt", lines=200)
    tokens, tok = load_tokens(text, "char")
    assert tok.decode(tokens[:50]) == text.read_text()[:50]
    assert tok.vocab_size == len(set(text.read_text())) and tokens.dtype == np.uint16
    path, record = token_paths(text, "char")
    made = path.stat().st_mtime_ns
    again, _ = load_tokens(text, "char")  # reused, not rebuilt
    assert path.stat().st_mtime_ns == made and np.array_equal(again, tokens)
    # The text changes: tokenized again, with the new characters in the vocabulary.
    text.write_text(text.read_text() + "\nzebra!")
    changed, tok2 = load_tokens(text, "char")
    assert len(changed) == len(tokens) + 7 and "z" in tok2.chars
    assert tok2.decode(changed[-6:]) == "zebra!"
    # A truncated token file is refused with one line, never read.
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 2)
    with pytest.raises(DataError, match=r"token file .*corpus.txt.char.tokens is corrupt \("
                                        r".* bytes, its record says .*\); delete it"):
        load_tokens(text, "char")
    # Same size, other bytes: the checksum catches it.
    path.unlink()
    load_tokens(text, "char")
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"is corrupt \(bytes 0 to [0-9,]+ differ from its "
                                        r"record's checksum\); delete it"):
        load_tokens(text, "char")
    record.write_text("{not json")
    with pytest.raises(DataError, match="is not a readable token record"):
        load_tokens(text, "char")


def test_a_token_file_changed_anywhere_or_beyond_its_vocabulary_is_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A 3 MB prepared token file overwritten in its middle with valid ids (size and
    modification time kept) is refused before training; so is an id beyond the vocabulary;
    a record from before full checksums is read with its edges checked and a warning."""
    import json
    import os

    from swa_research.data.text import load_prepared, write_ids

    rng = np.random.default_rng(0)
    path = tmp_path / "big.byte.tokens"
    write_ids([rng.integers(0, 256, 1_500_000)], "byte", 256, path, {"dataset": "random"})
    record = path.with_suffix(".json")
    assert path.stat().st_size == 3_000_000 and json.loads(record.read_text())["max_id"] == 255
    load_prepared(path, "byte")
    stat = path.stat()
    with open(path, "r+b") as f:  # the middle, far from the first and last MiB
        f.seek(1_500_000)
        f.write(np.arange(1000, dtype=np.uint16).tobytes())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DataError, match=r"big.byte.tokens is corrupt \(bytes 0 to 3,000,000 "
                                        r"differ from its record's checksum\)"):
        load_prepared(path, "byte")
    # An id beyond the vocabulary (a record that claims a smaller one).
    write_ids([rng.integers(0, 256, 5000)], "byte", 256, path, {"dataset": "random"})
    meta = json.loads(record.read_text())
    record.write_text(json.dumps({**meta, "vocab_size": 200}))
    with pytest.raises(DataError, match=r"holds id 25[0-9], beyond its vocabulary of 200"):
        load_prepared(path, "byte")
    # A record of format 1 (edges only): read, edges checked, said once.
    from swa_research.data.text import _edge_sha

    old = {k: v for k, v in meta.items() if k not in ("chunk_sha256", "chunk_bytes", "max_id")}
    record.write_text(json.dumps({**old, "format": 1, "edge_sha256": _edge_sha(path)}))
    with caplog.at_level("WARNING"):
        tokens, _ = load_prepared(path, "byte")
    assert len(tokens) == 5000 and "predates checksums of every byte" in caplog.text


def test_byte_tokens_and_a_folder_of_files(tmp_path: Path) -> None:
    folder = tmp_path / "src"
    (folder / "pkg").mkdir(parents=True)
    (folder / "a.py").write_text("print('héllo')\n")
    (folder / "pkg" / "b.py").write_text("x = 1\n")
    (folder / "notes.txt").write_text("not matched\n")
    tokens, tok = load_tokens(folder, "byte", pattern="**/*.py")
    assert tok.vocab_size == 256
    assert bytes(tokens.tolist()).decode() == "print('héllo')\nx = 1\n"
    assert token_paths(folder, "byte")[0].parent == folder  # beside the text
    with pytest.raises(DataError, match="no files match data.pattern='\\*\\*/\\*.md'"):
        load_tokens(folder, "byte", pattern="**/*.md")


def test_gpt2_tokens_without_the_encoding_are_one_line(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    """Offline, tiktoken cannot fetch GPT-2's BPE files: a one-line error naming the way out."""
    import tiktoken

    def offline(name: str) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(UserError, match="tiktoken cannot load the GPT-2 encoding "
                                        r"\(ConnectionError; offline"):
        load_tokens(write_text(tmp_path / "t.txt", lines=5), "gpt2")


def test_windows_are_a_function_of_the_epoch_seed_and_position(tmp_path: Path) -> None:
    """A resume at batch k draws the windows the uninterrupted epoch drew there; two ranks
    take the halves of the same global batches."""
    tokens, _ = load_tokens(write_text(tmp_path / "c.txt", lines=300), "char")
    s = TokenSet(tokens, 0, len(tokens) - 100, 16, 64, torch.device("cpu"))
    full = list(s.train_batches(8, True, 0, aug_seed=1234, shard=None))
    assert len(full) == 8
    resumed = list(s.train_batches(8, True, 5, aug_seed=1234, shard=None))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(full[5:], resumed, strict=True))
    x, y = full[0]
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    ranks = [list(s.train_batches(8, True, 0, 1234, (r, 2))) for r in (0, 1)]
    for k, (x, _) in enumerate(full):
        assert torch.equal(torch.cat([ranks[0][k][0], ranks[1][k][0]]), x)
    other = list(s.train_batches(8, True, 0, aug_seed=99, shard=None))
    assert not torch.equal(other[0][0], full[0][0])
    starts = s.window_starts(1234, torch.arange(64))
    assert starts.min() >= s.lo and starts.max() + 16 + 1 <= s.hi  # inside the split
    assert len(set(starts.tolist())) > 60  # drawn, not a fixed stride


@pytest.fixture(scope="module")
def lm_trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("lm")
    text = write_text(root / "corpus.txt")
    run_dir = root / "run"
    cfg = compose_config([*lm_run(text), "trainer.snapshot_every=5",
                          "trainer.snapshot_unit=iter", "swa.also=[ema,lawa]", "swa.lawa_k=3"])
    metrics = train(cfg, run_dir)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return run_dir, metrics


def test_a_tiny_gpt_learns_and_reports_loss_and_perplexity(lm_trained) -> None:
    run_dir, m = lm_trained
    assert m["status"] == "finished" and m["task"]["name"] == "lm"
    vocab = len(set(Path(run_dir.parent / "corpus.txt").read_text()))
    chance = math.log(vocab)
    for model in ("sgd", "swa", "ema"):
        assert m[model]["test_loss"] < 0.6 * chance, (model, m[model], chance)
        assert m[model]["val_ppl"] == pytest.approx(math.exp(m[model]["val_loss"]), rel=1e-12)
    assert m["calibration"] is None
    header = (run_dir / "history.csv").read_text().splitlines()[0].split(",")
    assert {"train_loss", "train_ppl", "sgd_val_loss", "swa_test_ppl"} <= set(header)
    assert not any(h.endswith("_acc") for h in header)
    assert m["swa"]["n_averaged"] == 4  # iterations 25, 30, 35, 40 of 40
    assert (m["lawa"]["n_averaged"], m["lawa"]["k"], m["lawa"]["updates"]) == (3, 3, 4)


def test_posthoc_swa_over_the_snapshots_equals_the_online_average(lm_trained,
                                                                  capsys) -> None:  # noqa: ANN001
    """Snapshots every 5 iterations; the equal average from iteration 25 is the online SWA
    (start 0.5 of 40 iterations, every 5): the same weights, so the same val loss."""
    run_dir, m = lm_trained
    assert posthoc_main([str(run_dir), "--swa-start", "25", "--device", "cpu"]) == 0
    rows = (run_dir / "posthoc.csv").read_text().splitlines()
    header = rows[0].split(",")
    row = dict(zip(header, rows[1].split(","), strict=True))
    assert row["n_points"] == "4"
    assert float(row["val_loss"]) == pytest.approx(m["swa"]["val_loss"], rel=1e-5)
    assert float(row["test_ppl"]) == pytest.approx(m["swa"]["test_ppl"], rel=1e-5)
    # LAWA k=3 over the snapshots (30, 35, 40) is the online LAWA's last three points.
    assert posthoc_main([str(run_dir), "--lawa-k", "3", "--device", "cpu"]) == 0
    lines = (run_dir / "posthoc.csv").read_text().splitlines()
    row = next(r for r in (dict(zip(lines[0].split(","), line.split(","), strict=True))
                           for line in lines[1:]) if r["kind"] == "lawa")
    assert row["n_points"] == "3"
    assert float(row["val_loss"]) == pytest.approx(m["lawa"]["val_loss"], rel=1e-5)


def test_an_image_model_for_the_lm_task_is_one_line(tmp_path: Path) -> None:
    text = write_text(tmp_path / "t.txt", lines=50)
    with pytest.raises(UserError, match=r"task=lm needs a language model \(model=gpt\), not "
                                        "model=simplified"):
        train(compose_config(["task=lm", "data=text", f"data.root={text}", "model=simplified",
                              "trainer.device=cpu"]), tmp_path / "run")


@pytest.mark.parametrize(("extra", "error"), [
    (["data=cifar10"], "task=lm trains on text: set data=text"),
    (["task=classification", "trainer.best_by=val_loss"],
     "data=text is for language models: set task=lm"),
    (["trainer.best_by=val_acc"], "trainer.best_by=val_acc: task lm reports val_loss, val_ppl"),
])
def test_a_config_the_lm_task_cannot_run_is_one_line(extra: list[str], error: str,
                                                      tmp_path: Path) -> None:
    text = write_text(tmp_path / "t.txt", lines=50)
    with pytest.raises(UserError, match=error):
        train(compose_config([*lm_run(text), *extra]), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


def launch(run_dir: Path, text: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **fault_env(fault)}
    return subprocess.run(
        [sys.executable, "-m", "swa_research.train", *lm_run(text), "trainer.epochs=2",
         "trainer.deterministic=true", f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=300)


@pytest.mark.slow
def test_a_killed_lm_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """Killed mid-epoch (step 15 of 20; the checkpoint is at 10): the resume draws the same
    windows and ends with the uninterrupted run's weights and losses."""
    text = write_text(tmp_path / "t.txt", lines=800)
    baseline, run_dir = tmp_path / "a", tmp_path / "b"
    assert launch(baseline, text).returncode == 0
    killed = launch(run_dir, text, fault="step@15")
    assert killed.returncode == -9, killed.stdout[-2000:]
    resumed = launch(run_dir, text)
    assert resumed.returncode == 0, resumed.stdout[-2000:]
    a = json.loads((baseline / "metrics.json").read_text())
    b = json.loads((run_dir / "metrics.json").read_text())
    assert a["sgd"] == b["sgd"] and a["swa"] == b["swa"]
    for name in ("sgd_final.pt", "swa.pt"):
        wa = torch.load(baseline / name, weights_only=False)["state_dict"]
        wb = torch.load(run_dir / name, weights_only=False)["state_dict"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_two_ranks_train_the_lm_as_one_process(tmp_path: Path) -> None:
    """torchrun with 2 ranks against one process, same global batch and seed, on a run that
    learns: the ranks take halves of the same windows, so the weights agree."""
    text = write_text(tmp_path / "t.txt", lines=800)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    args = [*lm_run(text), "trainer.epochs=2", "trainer.deterministic=true"]
    one = subprocess.run([sys.executable, "-m", "swa_research.train", *args,
                          f"hydra.run.dir={tmp_path / 'one'}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    def torchrun(run_dir: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc-per-node", "2", "--tee", "3", "-m", "swa_research.train",
                               *args, f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    two_dir = tmp_path / "two"
    two = torchrun(two_dir)
    if two.returncode != 0 and "SIGABRT" in two.stderr:
        # Seen once in CI (a rank aborted by the C++ runtime, no Python traceback, while the
        # default test set loaded both cores); not reproduced in dozens of runs. Its output is
        # kept in the warning, and the run is repeated once in a fresh dir.
        warnings.warn(f"torchrun child aborted; rerunning once: {two.stderr[-3000:]}",
                      stacklevel=1)
        two_dir = tmp_path / "two_again"
        two = torchrun(two_dir)
    assert two.returncode == 0, two.stderr[-4000:]
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "one", two_dir))
    assert m1["sgd"]["val_loss"] < 0.7 * math.log(17)  # it learned
    for name in ("sgd_final.pt", "swa.pt"):
        a = torch.load(tmp_path / "one" / name, weights_only=False)["state_dict"]
        b = torch.load(two_dir / name, weights_only=False)["state_dict"]
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst < 1e-5, (name, worst)
    assert m2["sgd"]["val_loss"] == pytest.approx(m1["sgd"]["val_loss"], abs=1e-5)


def test_adamw_decays_neither_norms_biases_nor_embeddings_when_asked() -> None:
    from swa_research.config import OptimizerConfig
    from swa_research.training.optim import build_optimizer

    model = build_model(resolve_model_config({"name": "gpt", "n_layer": 2, "n_head": 2,
                                              "n_embd": 16, "block_size": 8, "bias": True}), 11)
    opt = build_optimizer(OptimizerConfig(name="adamw", weight_decay=0.1,
                                          no_decay=["bias", "norm", "embedding"]), model)
    decayed, exempt = (opt.param_groups[0], opt.param_groups[1])
    assert (decayed["weight_decay"], exempt["weight_decay"]) == (0.1, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}  # the tied head is the wte
    assert sorted(names[id(p)] for p in exempt["params"]) == sorted(
        n for n, p in model.named_parameters()
        if n.endswith("bias") or ".ln_" in n or n.startswith("ln_f") or n in ("wte.weight",
                                                                              "wpe.weight"))
    assert all(p.dim() == 2 and names[id(p)].endswith("weight") for p in decayed["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters())  # every parameter once
    everything = build_optimizer(OptimizerConfig(name="adamw", weight_decay=0.1), model)
    assert len(everything.param_groups) == 1  # the default decays every parameter
    with pytest.raises(UserError, match="optimizer.no_decay: \\['layernorm'\\] are not"):
        build_optimizer(OptimizerConfig(name="adamw", no_decay=["layernorm"]), model)


def test_gradient_accumulation_and_clipping_take_the_batchs_step() -> None:
    """Four micro-batches give the one-batch step (to rounding); clipping bounds the norm."""
    from swa_research.training.step import TrainStep

    torch.manual_seed(0)
    cfg = resolve_model_config({"name": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 16,
                                "block_size": 8, "dropout": 0.0})
    models = [build_model(cfg, 11) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randint(0, 11, (8, 8))
    y = torch.roll(x, -1, dims=1)
    task_loss = build_task("lm").loss
    steps = [TrainStep(m, torch.optim.SGD(m.parameters(), lr=0.5), "fp32", torch.device("cpu"),
                       loss=task_loss, accumulate=k) for m, k in zip(models, (1, 4),
                                                                    strict=True)]
    (la, oa), (lb, ob) = steps[0](x, y), steps[1](x, y)
    assert lb.item() == pytest.approx(la.item(), rel=1e-6) and torch.allclose(oa, ob, atol=1e-6)
    for pa, pb in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)
    clipped = TrainStep(models[0], torch.optim.SGD(models[0].parameters(), lr=0.0), "fp32",
                        torch.device("cpu"), loss=task_loss, grad_clip=0.01)
    clipped(x, y)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in models[0].parameters()
                                                 if p.grad is not None]))
    assert norm.item() == pytest.approx(0.01, rel=1e-4)


def test_lawa_is_the_mean_of_its_latest_k_points_and_resumes() -> None:
    from swa_research.averaging import make_average

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    lawa = make_average("lawa", model, lawa_k=3)
    points = []
    for step in range(7):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * (step + 1))
        points.append([p.detach().clone() for p in model.parameters()])
        lawa.update(model)
        latest = points[-3:]
        for j, p in enumerate(lawa.module.parameters()):
            torch.testing.assert_close(p, torch.stack([q[j] for q in latest]).mean(0),
                                       rtol=1e-6, atol=1e-6)
    assert lawa.n_averaged == 3 and lawa.settings() == {"k": 3, "updates": 7}
    again = make_average("lawa", model, lawa_k=3)
    again.load_state_dict(lawa.state_dict())
    model.apply(lambda m: None)
    lawa.update(model)
    again.update(model)
    for a, b in zip(lawa.module.parameters(), again.module.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"^lawa_k=0: must be a whole number of at least 1"):
        make_average("lawa", model, lawa_k=0)


@pytest.mark.parametrize("preset", ["char_cpu", "shakespeare_char", "schedules_cpu", "lawa_cpu",
                                    "gpt2_owt", "gpt2_xl_fsdp", "averaging_study_cpu"])
def test_the_lm_presets_compose_and_validate(preset: str, tmp_path: Path) -> None:
    from swa_research.config import validate
    from swa_research.training.build import load_config

    cfg = compose_config([f"experiment=lm/{preset}", f"data.root={tmp_path}"])
    config = load_config(cfg)
    validate(config)
    assert (config.task.name, config.data.name, config.model["name"]) == ("lm", "text", "gpt")
    if preset == "shakespeare_char":  # nanoGPT's train_shakespeare_char.py
        m, o, s, t = config.model, config.optimizer, config.schedule, config.trainer
        assert (m["n_layer"], m["n_head"], m["n_embd"], m["block_size"], m["dropout"]) == (
            6, 6, 384, 256, 0.2)
        assert (o.lr, o.betas[1], o.weight_decay, o.grad_clip) == (1e-3, 0.99, 0.1, 1.0)
        assert (s.name, s.warmup, s.final_ratio) == ("warmup_cosine", 100, 0.1)
        assert (t.batch_size, t.max_steps, t.eval_every_steps) == (64, 5000, 250)
    if preset == "gpt2_owt":  # nanoGPT's train_gpt2.py: 600,000 iterations of 491,520 tokens
        m, o, s, t = config.model, config.optimizer, config.schedule, config.trainer
        assert (m["n_layer"], m["n_head"], m["n_embd"], m["block_size"], m["bias"]) == (
            12, 12, 768, 1024, False)
        assert (o.lr, tuple(o.betas), o.weight_decay, o.grad_clip) == (6e-4, (0.9, 0.95), 0.1,
                                                                       1.0)
        assert (s.name, s.warmup, s.final_ratio, config.data.tokenizer) == (
            "warmup_cosine", 2000, 0.1, "gpt2")
        assert (t.batch_size * m["block_size"], t.max_steps, t.eval_every_steps) == (
            491_520, 600_000, 1000)
        assert t.batch_size // t.grad_accum == 12 and config.data.eval_tokens == 200 * 12 * 1024
    if preset == "averaging_study_cpu":  # one budget, peak lr and warm-up for every schedule
        t, s, w = config.trainer, config.schedule, config.swa
        assert (t.max_steps, s.warmup, s.cooldown, s.cooldown_shape) == (500, 100, 0.2, "1-sqrt")
        assert (w.method, list(w.also), list(t.posthoc_ema)) == ("swa", ["lawa"], [0.05, 0.1])
    if preset == "gpt2_xl_fsdp":  # its header's budget and GPU hours, from the shapes
        m, s, t, w = config.model, config.schedule, config.trainer, config.swa
        assert (m["n_layer"], m["n_head"], m["n_embd"], t.strategy) == (48, 25, 1600, "fsdp")
        assert (s.name, s.cooldown, s.cooldown_shape) == ("wsd", 0.2, "1-sqrt")
        assert (w.method, list(w.also), w.lawa_k) == ("ema", ["lawa"], 6)
        steps = t.max_steps
        tokens = steps * t.batch_size * m["block_size"]
        assert (steps, tokens) == (60_000, 31_457_280_000)
        with torch.device("meta"):
            model = build_model(resolve_model_config(dict(m)), 50304)
        n = sum(p.numel() for p in model.parameters())
        assert 1.55e9 < n < 1.57e9
        flops = (6 * n + 12 * m["n_layer"] * m["block_size"] * m["n_embd"]) * tokens
        hours = flops / (0.4 * 989e12) / 3600
        header = (CONF_DIR / "experiment" / "lm" / "gpt2_xl_fsdp.yaml").read_text()
        assert f"~{round(hours, -1):.0f} H100-hours" in header.replace("\n# ", " "), hours
    if preset == "schedules_cpu":
        assert config.schedule.name == "warmup_constant"
    if preset == "lawa_cpu":
        assert config.swa.method == "lawa" and config.optimizer.lr == 3e-3


def test_the_sweep_presets_sweep_what_their_papers_compare(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from swa_research.conf import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module("swa_research.conf", version_base=None):
        for preset, want in (("schedules_cpu", {"schedule": "warmup_constant,warmup_cosine,wsd"}),
                             ("lawa_cpu", {"swa.lawa_k": "5,10,20", "swa.freq": "10,50"})):
            cfg = compose("config", overrides=[f"experiment=lm/{preset}",
                                               f"data.root={tmp_path}"],
                          return_hydra_config=True)
            assert dict(cfg.hydra.sweeper.params) == want
    GlobalHydra.instance().clear()


def test_the_mfu_is_the_models_flops_at_the_throughput_over_the_peak(tmp_path: Path,
                                                                      caplog) -> None:  # noqa: ANN001
    """nanoGPT's estimate_mfu: 6 N + 12 L T d per token; a CPU has no datasheet peak, so the
    log says MFU only with trainer.peak_tflops."""
    import logging

    from swa_research.training.speed import mfu, peak_tflops

    cfg = resolve_model_config({"name": "gpt", "n_layer": 12, "n_head": 12, "n_embd": 768,
                                "block_size": 1024, "dropout": 0.0, "bias": False})
    with torch.device("meta"):
        model = build_model(cfg, 50304)
    fpt = model.flops_per_token()
    n = sum(p.numel() for p in model.parameters()) - 1024 * 768
    assert fpt == 6 * n + 12 * 12 * 1024 * 768
    # nanoGPT's A100 figure: 312 TFLOPS bf16; at 135k tokens/s GPT-2 small is ~37% of it.
    assert mfu(fpt, 135_000, 312.0) == pytest.approx(fpt * 135_000 / 312e12)
    assert mfu(fpt, 8 * 135_000, 312.0, devices=8) == pytest.approx(mfu(fpt, 135_000, 312.0))
    assert mfu(None, 1e5, 312.0) is None and mfu(fpt, 1e5, None) is None
    assert peak_tflops(torch.device("cpu")) is None
    assert peak_tflops(torch.device("cpu"), 2.5) == 2.5
    text = write_text(tmp_path / "t.txt", lines=400)
    with caplog.at_level(logging.INFO, logger="swa_research.training.trainer"):
        m = train(compose_config([*lm_run(text), "trainer.epochs=1", "trainer.peak_tflops=0.5"]),
                  tmp_path / "run")
    tokens_per_s = m["train"]["tokens_per_s"]
    assert "images_per_s" not in m["train"]
    flops = m["model"]["flops_per_unit"]
    assert m["train"]["mfu"] == pytest.approx(flops * tokens_per_s / 0.5e12, rel=1e-3)
    line = next(r.getMessage() for r in caplog.records if "tokens/s" in r.getMessage())
    assert ", MFU " in line and line.endswith("%")


@pytest.mark.slow
def test_a_compiled_gpt_trains_as_the_eager_one(tmp_path: Path) -> None:
    """trainer.compile=true on the GPT (the CUDA path's torch.compile, here with the CPU's
    inductor): the same losses within float tolerance, state dicts without _orig_mod."""
    text = write_text(tmp_path / "t.txt", lines=800)
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["trainer.compile=true"])):
        runs[name] = train(compose_config([*lm_run(text), "trainer.epochs=2", *extra]),
                           tmp_path / name)
    for part in ("sgd", "swa"):
        assert runs["compiled"][part]["val_loss"] == pytest.approx(
            runs["eager"][part]["val_loss"], rel=2e-3)
    a = torch.load(tmp_path / "compiled" / "sgd_final.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "eager" / "sgd_final.pt", weights_only=False)["state_dict"]
    assert list(a) == list(b)


def test_the_log_gives_the_global_batch_in_tokens(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    import logging

    text = write_text(tmp_path / "t.txt", lines=400)
    with caplog.at_level(logging.INFO, logger="swa_research.training.results"):
        train(compose_config([*lm_run(text), "trainer.epochs=1", "trainer.batch_size=8",
                              "trainer.grad_accum=4"]), tmp_path / "run")
    assert "each step: 8 samples (256 tokens) in 4 micro-batch(es) of 2 per rank" in \
        caplog.text


def test_weights_of_one_character_set_do_not_start_a_run_on_another(tmp_path: Path) -> None:
    """A lower-case text and its upper-case twin have vocabularies of the same size; weights
    trained on one refuse to start a run on the other, and start one on the same text."""
    lower = write_text(tmp_path / "lower.txt", lines=400)
    upper = tmp_path / "upper.txt"
    upper.write_text(lower.read_text().upper())
    short = ["trainer.epochs=1", "data.windows_per_epoch=32", "swa.start=0.5", "swa.freq=1"]
    train(compose_config([*lm_run(lower), *short]), tmp_path / "a")
    saved = torch.load(tmp_path / "a" / "sgd_final.pt", weights_only=True)
    _, tok = load_tokens(lower, "char")
    assert saved["tokenizer"] == {"name": "char", "vocab_size": tok.vocab_size,
                                  "chars": tok.chars}
    init = f"trainer.init_weights={tmp_path / 'a' / 'sgd_final.pt'}"
    with pytest.raises(UserError, match=r"trainer.init_weights=.*sgd_final.pt: trained on "
                                        r"another character set of the same size \([0-9]+ of "
                                        f"{tok.vocab_size} ids stand for other characters"):
        train(compose_config([*lm_run(upper), *short, init]), tmp_path / "b")
    m = train(compose_config([*lm_run(lower), *short, init]), tmp_path / "c")
    assert m["status"] == "finished"


def test_without_a_test_split_each_evaluation_reads_the_tokens_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data.test_fraction=0: the test columns are the validation ones, evaluated once per
    model (the SGD model and each average), not twice over the same tokens."""
    from swa_research.training import evaluator

    calls: list[int] = []
    real = evaluator.evaluate

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluator, "evaluate", counted)
    text = write_text(tmp_path / "t.txt", lines=400)
    m = train(compose_config([*lm_run(text), "trainer.epochs=2", "data.windows_per_epoch=32",
                              "data.test_fraction=0", "swa.freq=1"]), tmp_path / "run")
    assert m["sgd"]["test_loss"] == m["sgd"]["val_loss"]
    assert m["swa"]["test_loss"] == m["swa"]["val_loss"] and m["swa"]["n_averaged"] > 0
    rows = list(csv.DictReader((tmp_path / "run" / "history.csv").open()))
    evaluated = sum(1 + (r["swa_val_loss"] != "") + (r.get("ema_val_loss", "") != "")
                    for r in rows)
    assert len(calls) == evaluated  # one pass per model and evaluation


def test_non_utf8_bytes_are_counted_and_a_binary_file_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = write_text(tmp_path / "t.txt", lines=300)
    data = text.read_bytes()
    text.write_bytes(data[:100] + b"\xff\xfe" + data[100:])  # two stray bytes
    with caplog.at_level("WARNING"):
        tokens, tok = load_tokens(text, "char")
    assert "2 byte(s) are not UTF-8 and were read as U+FFFD" in caplog.text
    assert "\ufffd" in tok.chars and len(tokens) == len(data) + 2 - 0
    binary = tmp_path / "b.txt"
    binary.write_bytes(bytes(range(256)) * 40)
    for tokenizer in ("char", "byte"):
        with pytest.raises(DataError, match=r"b.txt: [0-9,]+ of 10,240 bytes are not UTF-8 "
                                            r"text \(.*%, more than 0.1%\): a binary file"):
            load_tokens(binary, tokenizer)
        assert not token_paths(binary, tokenizer)[0].exists()


def test_a_killed_tokenizations_temporary_file_is_removed(tmp_path: Path) -> None:
    text = write_text(tmp_path / "t.txt", lines=50)
    tokens, _ = token_paths(text, "char")
    stale = tokens.with_name(f".{tokens.name}.99999.tmp")
    stale.write_bytes(b"half written")
    load_tokens(text, "char")
    assert not stale.exists() and tokens.is_file()


def test_sample_draws_repeatable_text_from_the_sgd_model_or_an_average(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """python -m swa_research.sample: the same seed gives the same text; temperature 0 is the
    greedy chain, checked against the model's argmax written out here; the prompt and the
    weights are checked in one line."""
    from swa_research.analysis.sample import main
    from swa_research.models import build_model

    text = write_text(tmp_path / "t.txt", lines=400)
    run = tmp_path / "run"
    cfg = compose_config([*lm_run(text), "trainer.epochs=1", "data.windows_per_epoch=64",
                          "swa.start=0.5", "swa.freq=1"])
    train(cfg, run)
    (run / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    args = [str(run), "--prompt", "the ", "--tokens", "30", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0 and capsys.readouterr().out == first
    assert first.startswith("the ") and len(first.rstrip("\n")) == 34
    assert main([*args[:-1], "4"]) == 0 and capsys.readouterr().out != first
    # Greedy, by hand: the likeliest next character, 20 times, from the average's weights.
    assert main([str(run), "--weights", "swa", "--prompt", "the ", "--tokens", "20",
                 "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out.rstrip("\n")
    saved = torch.load(run / "swa.pt", weights_only=True)
    _, tok = load_tokens(text, "char")
    model = build_model(load_config(cfg).model, tok.vocab_size, 32)
    model.load_state_dict(saved["state_dict"])
    model.eval()
    ids = [tok.chars.index(c) for c in "the "]
    with torch.no_grad():
        for _ in range(20):
            ids.append(int(model(torch.tensor([ids[-32:]]))[0, -1].argmax()))
    assert greedy == tok.decode(ids)
    assert main([str(run), "--prompt", "Z€"]) == 2
    assert "--prompt: 'Z€' not in the run's vocabulary" in capsys.readouterr().err
    assert main([str(run), "--weights", "nope"]) == 2
    assert "this run kept sgd, ema, swa" in capsys.readouterr().err


def test_the_debug_limits_shorten_a_language_model_run(tmp_path: Path) -> None:
    """debug=fdr: one training batch and one evaluation batch of each split, as for images
    (the windows of an epoch and of the held-out splits cut to the limits)."""
    text = write_text(tmp_path / "t.txt", lines=400)
    # The preset and a small model; the debug group's own budget and plan (nothing overrides
    # them on this command line).
    run = ["experiment=lm/char_cpu", f"data.root={text}", "model.n_layer=1", "model.n_head=2",
           "model.n_embd=16", "model.block_size=16", "trainer.device=cpu",
           "trainer.progress=none"]
    m = train(compose_config([*run, "debug=fdr"]), tmp_path / "fdr")
    assert m["status"] == "finished" and m["train"]["iterations"] == 1
    assert m["swa"]["n_averaged"] == 1
    m = train(compose_config([*run, "debug=limit"]), tmp_path / "limit")
    assert m["train"]["iterations"] == 3 * 10  # 3 epochs of limit_train_batches=10
    with pytest.raises(UserError, match=r"^trainer.overfit_batches \(debug=overfit\) fits "
                                        "fixed images"):
        train(compose_config([*run, "debug=overfit"]), tmp_path / "overfit")


def test_a_language_model_sweep_says_tokens_and_loss_not_images_and_accuracy(
        tmp_path: Path) -> None:
    """metrics.json names the throughput by the task's unit (train.tokens_per_s), the sweep
    report draws the headline's curves as report_loss.png (not report_accuracy.png), has no
    calibration columns nor "ECE in %" (a language model has none), and a long run name wraps
    in the plots' titles instead of widening them."""
    import json

    from omegaconf import OmegaConf

    from swa_research.analysis.report import write_report
    from swa_research.tracking.plots import TITLE_WIDTH, wrapped

    text = write_text(tmp_path / "t.txt", lines=400)
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        cfg = compose_config([*lm_run(text), "trainer.epochs=1", "swa.start=0", f"seed={seed}"])
        train(cfg, sweep / str(seed))
        (sweep / str(seed) / ".hydra").mkdir()
        OmegaConf.save(cfg, sweep / str(seed) / ".hydra" / "config.yaml")
    m = json.loads((sweep / "0" / "metrics.json").read_text())
    assert m["train"]["tokens_per_s"] > 0 and "images_per_s" not in m["train"]
    report = write_report(sweep, use_wandb=False)
    assert (sweep / "report_loss.png").is_file() and (sweep / "report_swa_gain.png").is_file()
    assert not (sweep / "report_accuracy.png").exists()
    assert "ECE" not in report.markdown and " in %" not in report.markdown
    header = (sweep / "report.csv").read_text().splitlines()[0]
    assert "_ece" not in header and "_nll" not in header and "swa_test_loss_mean" in header
    name = ",".join(f"model.n_layer={i},optimizer.lr=0.00{i}" for i in range(8))
    lines = wrapped(f"Loss {name}").splitlines()
    assert len(lines) > 3 and max(len(line) for line in lines) <= TITLE_WIDTH
    assert "".join(lines).replace(" ", "") == f"Loss{name}"


def test_token_files_go_to_the_cache_when_the_text_is_not_the_users(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beside a text the user owns and can write, the token file and its record are written
    there; a text folder of another owner (a system folder such as the standard library's)
    gets them in the user's cache instead, with the same contents; no lock file stays
    behind in either place."""
    import os

    from swa_research.data.text import load_tokens

    monkeypatch.setenv("SWA_CACHE_DIR", str(tmp_path / "cache"))
    mine = tmp_path / "mine"
    mine.mkdir()
    write_text(mine / "a.txt", lines=200)
    ids_mine, _ = load_tokens(mine, "char")
    assert sorted(p.name for p in mine.iterdir()) == [".text.char.json", ".text.char.tokens",
                                                      "a.txt"]
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    write_text(theirs / "a.txt", lines=200)
    if os.getuid() == 0:  # root: make the folder another user's
        os.chown(theirs, 12345, 12345)
    else:
        theirs.chmod(0o555)
    try:
        ids_theirs, _ = load_tokens(theirs, "char")
    finally:
        theirs.chmod(0o755)
    assert sorted(p.name for p in theirs.iterdir()) == ["a.txt"]
    cached = sorted(p.name for p in (tmp_path / "cache" / "tokens").iterdir())
    assert len(cached) == 2 and all(n.startswith("theirs-") for n in cached), cached
    assert [n.rsplit(".", 1)[1] for n in cached] == ["json", "tokens"]
    assert np.array_equal(np.asarray(ids_mine), np.asarray(ids_theirs))
    assert not list(tmp_path.rglob("*.lock"))
