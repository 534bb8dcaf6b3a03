"""Token files prepared from a Hugging Face data set (scripts/prepare_text.py): the format
data=text trains on, checked against its record, and one line when the data set cannot load."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config
from test_lm import lm_run

from swa_research.config import UserError
from swa_research.data.text import load_tokens, write_token_file
from swa_research.errors import DataError
from swa_research.training.build import train

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far"]


def docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 40)))) + "." for _ in range(n)]


def script() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("prepare_text", ROOT / "scripts" /
                                                  "prepare_text.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_prepared_file_holds_the_documents_and_trains(tmp_path: Path) -> None:
    texts = docs(600)
    out = tmp_path / "corpus.byte.tokens"
    seen: list[tuple[int, int]] = []
    meta = write_token_file(iter(texts), "byte", out, {"dataset": "generated"}, batch=256,
                            progress=lambda d, t: seen.append((d, t)))
    expected = "".join(t + "\n\n" for t in texts).encode()
    assert meta["n_tokens"] == len(expected) and meta["source"]["documents"] == 600
    assert [d for d, _ in seen] == [256, 512, 600] and seen[-1][1] == len(expected)
    assert json.loads(out.with_suffix(".json").read_text())["source"]["dataset"] == "generated"
    tokens, tok = load_tokens(out, "byte")
    assert bytes(np.asarray(tokens, dtype=np.uint8)) == expected and tok.vocab_size == 256
    # data.root=<file>.tokens trains as the text would (and is never rebuilt).
    made = out.stat().st_mtime_ns
    m = train(compose_config([*lm_run(out), "data.tokenizer=byte", "trainer.epochs=1"]),
              tmp_path / "run")
    assert m["status"] == "finished" and m["sgd"]["val_loss"] < np.log(256)
    assert out.stat().st_mtime_ns == made


def test_a_prepared_file_is_refused_without_its_record_with_another_tokenizer_or_corrupt(
        tmp_path: Path) -> None:
    out = tmp_path / "c.byte.tokens"
    write_token_file(docs(50), "byte", out, {"dataset": "generated"})
    with pytest.raises(UserError, match=r"holds byte tokens: set data.tokenizer=byte"):
        load_tokens(out, "char")
    with open(out, "r+b") as f:
        f.truncate(out.stat().st_size - 1)
    with pytest.raises(DataError, match=r"token file .*c.byte.tokens is corrupt"):
        load_tokens(out, "byte")
    out.with_suffix(".json").unlink()
    with pytest.raises(DataError, match=r"no record c.byte.json beside it"):
        load_tokens(out, "byte")
    with pytest.raises(UserError, match=r"a prepared token file is gpt2 or byte"):
        write_token_file(docs(2), "char", tmp_path / "x.char.tokens", {})
    with pytest.raises(UserError, match=r"must end in .tokens"):
        write_token_file(docs(2), "byte", tmp_path / "x.bin", {})


def test_the_script_writes_a_data_sets_texts_and_says_in_one_line_when_it_cannot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    prepare = script()
    rows = [{"text": t, "id": i} for i, t in enumerate(docs(40))]
    calls: list[tuple] = []

    def load_dataset(name, config=None, **kwargs):  # noqa: ANN001, ANN202
        calls.append((name, config, kwargs))
        if name == "openwebtext":
            raise ConnectionError("Couldn't reach 'openwebtext' on the Hub")
        return iter(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    out = tmp_path / "hub.byte.tokens"
    assert prepare.main(["--dataset", "someone/corpus", "--name", "v1", "--tokenizer", "byte",
                         "--limit", "30", "--streaming", "--out", str(out)]) == 0
    assert calls[0] == ("someone/corpus", "v1", {"split": "train", "streaming": True})
    tokens, _ = load_tokens(out, "byte")
    assert len(tokens) == sum(len(r["text"]) + 2 for r in rows[:30])
    assert "from 30 documents" in capsys.readouterr().out
    assert prepare.main(["--dataset", "openwebtext", "--out", str(tmp_path / "o.tokens")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot load data set 'openwebtext' (ConnectionError") and \
        "\n" not in err and not (tmp_path / "o.tokens").exists()
    assert prepare.main(["--dataset", "x", "--text-column", "body", "--tokenizer", "byte",
                         "--out", str(tmp_path / "b.tokens")]) == 2
    assert "--text-column body: the data set's columns are text, id" in capsys.readouterr().err
    assert not (tmp_path / "b.tokens").exists() and not list(tmp_path.glob(".b.tokens*"))
    assert prepare.main(["--dataset", "text", "--data-files", "/nomatch/*.txt", "--out",
                         str(tmp_path / "g.tokens")]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: --data-files '/nomatch/*.txt': no file matches it"
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    assert prepare.main(["--dataset", "x", "--out", str(tmp_path / "n.tokens")]) == 2
    assert "needs the datasets package" in capsys.readouterr().err


def test_gpt2_documents_end_with_the_end_of_text_token(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """As nanoGPT's prepare.py: ids of each document, then 50256 (tiktoken's BPE files cannot
    be fetched offline: a stand-in encoder with tiktoken's batch call gives the ids)."""
    import swa_research.data.text as text

    class Bpe:
        eot_token = 50256

        def encode_ordinary_batch(self, batch: list[str]) -> list[list[int]]:
            return [[WORDS.index(w.strip(".")) + 1000 for w in d.split()] for d in batch]

    monkeypatch.setattr(text, "gpt2_tokenizer",
                        lambda: text.Tokenizer("gpt2", 50257, _bpe=Bpe()))
    out = tmp_path / "c.gpt2.tokens"
    meta = write_token_file(["the cat sat.", "dog ran"], "gpt2", out, {})
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 50257
    tokens, tok = load_tokens(out, "gpt2")  # read without tiktoken
    assert tokens.tolist() == [1000, 1001, 1002, 50256, 1005, 1006, 50256]
    assert tok.vocab_size == 50257
