"""model.weights=gpt2: OpenAI's GPT-2 weights in our GPT. A small GPT-2-shaped model built and
saved by Hugging Face transformers is the reference: our GPT, loaded from its files, gives its
logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swa_research.models import gpt2_weights
from swa_research.models.gpt import gpt

transformers = pytest.importorskip("transformers")

VOCAB = 50257


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A 2-layer GPT-2 (4 heads, 64 wide, 128 positions, GPT-2's vocabulary) with random
    weights and random biases (not the zeros of a fresh init), saved as save_pretrained does."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128,
                                     vocab_size=VOCAB, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    model.save_pretrained(folder)
    return folder, model


def reference_logits(model: object, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # type: ignore[operator]


def test_our_gpt_gives_the_transformers_models_logits(hf_model: tuple[Path, object]) -> None:
    folder, model = hf_model
    assert (folder / "model.safetensors").is_file()
    ours = gpt(VOCAB, weights=str(folder), block_size=128, dropout=0.0).eval()
    assert ours.n_layer == 2 and ours.h[0].attn.n_head == 4
    assert ours.h[0].mlp.gelu.approximate == "tanh"  # GPT-2's gelu_new
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine = ours(ids)
    ref = reference_logits(model, ids)
    assert mine.shape == ref.shape == (2, 40, VOCAB)
    assert (mine - ref).abs().max().item() < 1e-4
    assert ref.abs().max().item() > 0.1  # not a vacuous comparison


def test_a_shorter_block_crops_the_position_embeddings(hf_model: tuple[Path, object]) -> None:
    folder, model = hf_model
    ours = gpt(VOCAB, weights=str(folder), block_size=32, dropout=0.0).eval()
    assert ours.wpe.weight.shape == (32, 64)
    ids = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids) - reference_logits(model, ids)).abs().max().item() < 1e-4


def test_one_safetensors_file_without_its_config(hf_model: tuple[Path, object]) -> None:
    """A bare file: layers and width from the tensors, the heads from model.n_head (a width of
    no release)."""
    folder, model = hf_model
    ours = gpt(VOCAB, weights=str(folder / "model.safetensors"), n_head=4, block_size=128,
               dropout=0.0).eval()
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(ids) - reference_logits(model, ids)).abs().max().item() < 1e-4


def test_a_release_offline_and_not_cached_is_one_line(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at its import: its constant too (no network
    # here, where a download attempt would wait for its timeout).
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as e:
        gpt(VOCAB, weights="gpt2", block_size=64)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.weights=gpt2: OpenAI's GPT-2 weights")
    assert "https://huggingface.co/openai-community/gpt2" in msg
    assert "model.weights=FOLDER" in msg


def test_a_release_in_the_hugging_face_cache_is_found(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub cache's layout (refs/main names the snapshot) is where the release is read."""
    hub = tmp_path / "hub"
    repo = hub / "models--openai-community--gpt2-medium"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(b"x")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    assert gpt2_weights.release_file("gpt2-medium") == snap / "model.safetensors"


def test_the_releases_shapes_are_checked_without_reading(tmp_path: Path) -> None:
    """On the meta device (the config's check) a release builds its shape by name."""
    with torch.device("meta"):
        model = gpt(2, weights="gpt2-xl", block_size=1024)
    assert (model.n_layer, model.h[0].attn.n_head, model.wte.weight.shape) == (48, 25,
                                                                                (VOCAB, 1600))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"weights": "gpt2", "vocab_multiple": 64}, "not padded; set model.vocab_multiple=1"),
    ({"weights": "gpt2", "block_size": 2048}, "beyond GPT-2's 1024 positions"),
    ({"weights": "/no/such/folder"}, "neither a GPT-2 release"),
])
def test_bad_weights_options_are_one_line(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        gpt(VOCAB, **kwargs)


def test_another_vocabulary_is_refused(hf_model: tuple[Path, object]) -> None:
    with pytest.raises(ValueError, match=r"vocabulary is 50,257 BPE tokens, this run's "
                                         r"tokenizer has 444: set data.tokenizer=gpt2"):
        gpt(444, weights=str(hf_model[0]), block_size=64)


def test_a_run_starts_from_the_weights_and_fine_tunes(hf_model: tuple[Path, object],
                                                      tmp_path: Path) -> None:
    """model.weights=FOLDER with data.tokenizer=gpt2 on a prepared token file: the run's
    evaluation before the first step is the transformers model's loss on the same validation
    windows (computed here from the token file), and SWA over the fine-tuning steps is kept."""
    import csv

    import numpy as np
    from conftest import compose_config

    from swa_research.data.text import write_ids
    from swa_research.tasks.lm import split_bounds
    from swa_research.training.build import train

    folder, model = hf_model
    ids = np.random.default_rng(0).integers(0, VOCAB, size=6000)
    tokens = tmp_path / "ids.tokens"
    write_ids([ids], "gpt2", VOCAB, tokens, {"test": 1})
    block = 32
    m = train(compose_config([
        "experiment=lm/char_cpu", f"data.root={tokens}", "data.tokenizer=gpt2",
        f"model.weights={folder}", f"model.block_size={block}", "model.dropout=0.0",
        "data.val_fraction=0.1", "data.test_fraction=0.1", "data.eval_tokens=0",
        "data.windows_per_epoch=16", "trainer.batch_size=4", "trainer.eval_batch_size=8",
        "trainer.max_steps=6", "trainer.eval_every_steps=3", "trainer.checkpoint_every_steps=0",
        "trainer.eval_at_start=true", "trainer.device=cpu", "trainer.progress=none",
        "swa.start=0.5", "swa.freq=1", "swa.also=[]", "optimizer.lr=1e-4", "swa.lr=1e-4"]),
        tmp_path / "run")
    assert m["status"] == "finished" and m["swa"]["n_averaged"] == 3
    with open(tmp_path / "run" / "history.csv", newline="") as f:
        start = next(csv.DictReader(f))
    lo, hi = split_bounds(len(ids), 0.1, 0.1)
    count = (hi - lo - 1) // block
    windows = torch.stack([torch.from_numpy(ids[lo + k * block: lo + k * block + block + 1])
                           for k in range(count)])
    logits = reference_logits(model, windows[:, :-1])
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), windows[:, 1:].reshape(-1))
    assert float(start["sgd_val_loss"]) == pytest.approx(ref.item(), rel=1e-5)
