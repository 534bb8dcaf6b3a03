"""Text for language models, bigger than memory by construction: a text file or a folder of
them is tokenized once into a token file beside it (``<name>.<tokenizer>.tokens``, a flat
array of uint16/uint32 ids, memory-mapped) with a record of what it was made from
(``<name>.<tokenizer>.json``: the files' sizes and modification times, the vocabulary). A
later run reuses it; a changed text rebuilds it; a token file whose size or checksum does not
match its record is refused with one line (never read as if it were whole). The checksum covers
every byte (a SHA-256 per 64 MiB chunk, hashed on several threads at every start), and the same
pass finds the largest id, which must fit the vocabulary.

The tokens are split in order: train, then ``data.val_fraction`` for validation and
``data.test_fraction`` for test. Training windows (``block_size`` + 1 tokens: the inputs and
the next-token targets) start at positions drawn per window from the epoch's seed and the
window's position in the epoch (splitmix64, as the images' crops): a resume at any step draws
the same windows, and DDP ranks take slices of the same global batches. Evaluation reads a
split's consecutive windows from its start (at most ``data.eval_tokens`` tokens).

A token file prepared elsewhere (``scripts/prepare_text.py``: a Hugging Face data set such as
OpenWebText or FineWeb, as nanoGPT's ``prepare.py``) is given as ``data.root=<name>.tokens``
with its record ``<name>.json`` beside it: checked against the record, never rebuilt.

Tokenizers: ``char`` (the text's characters, nanoGPT's shakespeare_char), ``byte`` (UTF-8
bytes, 256 ids) and ``gpt2`` (GPT-2's BPE through ``tiktoken``, when its encoding can be
loaded: it downloads it once, so offline it needs the encoding already in its cache).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from swa_research.config import UserError
from swa_research.data.transforms import image_seeds
from swa_research.errors import DataError
from swa_research.fileio import atomic_write_text, own_writable, user_cache_dir
from swa_research.locks import file_lock

log = logging.getLogger(__name__)

TOKENIZERS = ("char", "byte", "gpt2")
FORMAT = 2  # 2: a checksum of every chunk and the largest id; 1: the first and last MiB only
CHUNK = 1 << 22  # characters tokenized at a time
HASH_CHUNK = 1 << 26  # bytes a checksum covers (64 MiB: a multiple of every id width)


@dataclass
class Tokenizer:
    name: str
    vocab_size: int
    chars: str = ""  # char: the vocabulary, id = position
    _bpe: Any = None

    def encode(self, text: str) -> np.ndarray:
        if self.name == "byte":
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        if self.name == "char":
            index = {c: i for i, c in enumerate(self.chars)}
            return np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))
        return np.asarray(self._bpe.encode_ordinary(text), dtype=np.int64)

    def decode(self, ids: Any) -> str:
        ids = [int(i) for i in ids]
        if self.name == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        if self.name == "char":
            return "".join(self.chars[i] for i in ids)
        return str(self._bpe.decode(ids))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.uint32)


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's BPE (50257 ids) through tiktoken; a one-line error when it cannot be loaded."""
    try:
        import tiktoken

        bpe = tiktoken.get_encoding("gpt2")
    except ImportError:
        raise UserError("data.tokenizer=gpt2 needs the tiktoken package (pip install "
                        "tiktoken)") from None
    except Exception as e:
        raise UserError(f"data.tokenizer=gpt2: tiktoken cannot load the GPT-2 encoding "
                        f"({type(e).__name__}; offline it must already be in tiktoken's cache, "
                        "TIKTOKEN_CACHE_DIR); use data.tokenizer=char or byte") from None
    return Tokenizer("gpt2", bpe.n_vocab, _bpe=bpe)


def text_files(root: Path, pattern: str) -> list[Path]:
    """The text: ``root`` itself, or the files under it matching ``pattern``, sorted."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"data.root={root}: no such file or folder (a text file, or a folder "
                        "of them)")
    files = sorted(p for p in root.glob(pattern) if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"data.root={root}: no files match data.pattern={pattern!r}")
    return files


def _fingerprint(root: Path, files: list[Path]) -> list[list[Any]]:
    base = root if root.is_dir() else root.parent
    return [[str(f.relative_to(base)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


# Bytes that are not UTF-8 become U+FFFD; they are counted (one decoding thread at a time:
# tokenizing holds the token file's lock), said, and beyond a small share refused.
_REPLACED = [0]
MAX_REPLACED_SHARE = 0.001


def _count_replaced(e: UnicodeError) -> tuple[str, int]:
    assert isinstance(e, UnicodeDecodeError)
    _REPLACED[0] += e.end - e.start
    return "\ufffd", e.end


codecs.register_error("swa_research.count_replaced", _count_replaced)


def _read(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="swa_research.count_replaced") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _check_replaced(root: Path, files: list[Path], replaced: int) -> None:
    """Say how many bytes were not UTF-8; refuse a text that is mostly not text."""
    total = sum(f.stat().st_size for f in files) or 1
    if replaced > MAX_REPLACED_SHARE * total:
        raise DataError(f"data.root={root}: {replaced:,} of {total:,} bytes are not UTF-8 text "
                        f"({100 * replaced / total:.2f}%, more than "
                        f"{100 * MAX_REPLACED_SHARE:g}%): a binary file or another encoding? "
                        "Convert it to UTF-8, or narrow data.pattern")
    if replaced:
        log.warning("data.root=%s: %d byte(s) are not UTF-8 and were read as U+FFFD", root,
                    replaced)


def _edge_sha(path: Path) -> str:
    """The checksum of a format-1 record: the token file's first and last MiB and its size
    (records written before every byte was checked)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()


def scan(path: Path, dtype: np.dtype, threads: int | None = None,
         chunk: int = HASH_CHUNK) -> tuple[list[str], int]:
    """The SHA-256 of every ``chunk`` bytes of a token file, and its largest id (-1 when
    empty): every byte read once, the chunks on ``threads`` threads (hashlib and numpy
    release the GIL). Its cost per GB is in docs/lm.md."""
    size = path.stat().st_size
    starts = list(range(0, size, chunk))

    def one(start: int) -> tuple[str, int]:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(chunk)
        ids = np.frombuffer(data, dtype=dtype, count=len(data) // dtype.itemsize)
        return hashlib.sha256(data).hexdigest(), int(ids.max()) if ids.size else -1

    workers = threads or min(8, os.cpu_count() or 1)
    if len(starts) <= 1 or workers <= 1:
        results = [one(s) for s in starts]
    else:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, starts))
    return [h for h, _ in results], max((m for _, m in results), default=-1)


def token_paths(root: Path, tokenizer: str) -> tuple[Path, Path]:
    """Where the tokens of ``root`` and their record live: beside a file, inside a folder,
    when that folder is writable and the user's own; otherwise (a system folder such as the
    Python standard library's, a shared read-only data set) in the user's cache
    (``$SWA_CACHE_DIR``, ``$XDG_CACHE_HOME/swa_research`` or ``~/.cache/swa_research``,
    ``tokens/``), under a name keyed by the text's path."""
    folder = root if root.is_dir() else root.parent
    if own_writable(folder):
        base = root / f".text.{tokenizer}" if root.is_dir() else root.with_name(
            f"{root.name}.{tokenizer}")
    else:
        key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
        cache = user_cache_dir() / "tokens"
        cache.mkdir(parents=True, exist_ok=True)
        base = cache / f"{root.name}-{key}.{tokenizer}"
    return base.with_name(base.name + ".tokens"), base.with_name(base.name + ".json")


def remove_stale_temporaries(tokens: Path) -> None:
    """Temporary token files a killed tokenization left (``.<name>.<pid>.tmp``): every writer
    holds the token file's lock, so under it any that exists is stale."""
    for tmp in tokens.parent.glob(f".{tokens.name}.*.tmp"):
        tmp.unlink(missing_ok=True)
        log.info("removed %s, left by a tokenization that was killed", tmp)


def _write(ids: Iterable[np.ndarray], dtype: np.dtype, tokens: Path) -> int:
    """The ids, in order, into ``tokens`` atomically (a temporary file beside it, synced, then
    renamed); their number."""
    tmp = tokens.with_name(f".{tokens.name}.{os.getpid()}.tmp")
    n = 0
    try:
        with open(tmp, "wb") as out:
            for chunk in ids:
                out.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
                n += chunk.size
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, tokens)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write the token file {tokens} ({e.strerror or e}); its "
                        "folder must be writable") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def _record(tokenizer: Tokenizer, n: int, tokens: Path, **source: Any) -> dict[str, Any]:
    chunks, max_id = scan(tokens, tokenizer.dtype)
    if max_id >= tokenizer.vocab_size:
        raise DataError(f"token file {tokens}: id {max_id} is beyond the vocabulary of "
                        f"{tokenizer.vocab_size} ({tokenizer.name})")
    return {"format": FORMAT, "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "chars": tokenizer.chars, "dtype": tokenizer.dtype.name, "n_tokens": n, **source,
            "chunk_bytes": HASH_CHUNK, "chunk_sha256": chunks, "max_id": max_id}


def _build(root: Path, files: list[Path], tokenizer: Tokenizer, tokens: Path, record: Path,
           fingerprint: list[list[Any]]) -> dict[str, Any]:
    _REPLACED[0] = 0
    if tokenizer.name == "char":
        chars: set[str] = set()
        for f in files:
            for chunk in _read(f):
                chars.update(chunk)
        _check_replaced(root, files, _REPLACED[0])  # before anything is written
        tokenizer.chars = "".join(sorted(chars))
        tokenizer.vocab_size = max(1, len(tokenizer.chars))
    log.info("tokenizing %d file(s) under %s (%s) into %s", len(files), root, tokenizer.name,
             tokens)
    _REPLACED[0] = 0
    n = _write((tokenizer.encode(chunk) for f in files for chunk in _read(f)),
               tokenizer.dtype, tokens)
    if tokenizer.name != "char":
        try:
            _check_replaced(root, files, _REPLACED[0])
        except DataError:
            tokens.unlink(missing_ok=True)
            raise
    meta = _record(tokenizer, n, tokens, files=fingerprint)
    atomic_write_text(record, json.dumps(meta, indent=1))
    return meta


def write_token_file(documents: Iterable[str], tokenizer: str, tokens: str | Path,
                     source: dict[str, Any], batch: int = 1024,
                     progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Documents (a Hugging Face data set's texts, in order) tokenized into ``tokens`` (a
    ``.tokens`` path) and its record beside it (``.json``, with ``source`` describing where they
    came from), the format ``data.root=<file>.tokens`` trains on. As nanoGPT's ``prepare.py``:
    ``gpt2`` ends each document with its end-of-text token (50256); ``byte`` separates them by a
    blank line. ``progress(documents, tokens)`` is called after each batch. Returns the record."""
    if tokenizer not in ("gpt2", "byte"):
        raise UserError(f"tokenizer {tokenizer!r}: a prepared token file is gpt2 or byte (char "
                        "needs the whole text's characters first: train on the text itself)")
    tokens = Path(tokens).expanduser()
    if tokens.suffix != ".tokens":
        raise UserError(f"{tokens}: the token file's name must end in .tokens")
    tok = gpt2_tokenizer() if tokenizer == "gpt2" else Tokenizer("byte", 256)
    counts = [0, 0]

    def ids() -> Iterator[np.ndarray]:
        docs: list[str] = []
        for doc in documents:
            docs.append(doc)
            if len(docs) == batch:
                yield from encode(docs)
                docs = []
        if docs:
            yield from encode(docs)

    def encode(docs: list[str]) -> Iterator[np.ndarray]:
        if tok.name == "gpt2":
            eot = tok._bpe.eot_token
            out = [np.asarray([*d, eot], dtype=np.int64)
                   for d in tok._bpe.encode_ordinary_batch(docs)]
        else:
            out = [tok.encode(d + "\n\n") for d in docs]
        counts[0] += len(docs)
        counts[1] += sum(o.size for o in out)
        if progress is not None:
            progress(*counts)
        yield from out

    return _prepare(ids(), tok, tokens, lambda: {**source, "documents": counts[0]})


def write_ids(ids: Iterable[np.ndarray], tokenizer: str, vocab_size: int, tokens: str | Path,
              source: dict[str, Any]) -> dict[str, Any]:
    """Token ids already made (chunks of integers below ``vocab_size``, e.g. a benchmark's
    random ones) into ``tokens`` and its record, as :func:`write_token_file`."""
    tokens = Path(tokens).expanduser()
    if tokens.suffix != ".tokens":
        raise UserError(f"{tokens}: the token file's name must end in .tokens")
    return _prepare(ids, Tokenizer(tokenizer, vocab_size), tokens, lambda: source)


def _prepare(ids: Iterable[np.ndarray], tok: Tokenizer, tokens: Path,
             source: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    tokens.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(tokens.with_name(tokens.name + ".lock"), f"writing {tokens}"):
        remove_stale_temporaries(tokens)
        n = _write(ids, tok.dtype, tokens)
        meta = _record(tok, n, tokens, source=source())
        atomic_write_text(tokens.with_suffix(".json"), json.dumps(meta, indent=1))
    return meta


def load_prepared(tokens: Path, tokenizer: str) -> tuple[np.memmap, Tokenizer]:
    """A token file made by :func:`write_token_file` (or any ``.tokens`` file with its record
    beside it), checked against its record and memory-mapped."""
    record = tokens.with_suffix(".json")
    meta = _read_record(record)
    if meta is None:
        raise DataError(f"data.root={tokens}: no record {record.name} beside it (a token file "
                        "is read with the record scripts/prepare_text.py writes)")
    if meta.get("format") not in (1, FORMAT) or meta.get("tokenizer") not in TOKENIZERS:
        raise DataError(f"{record} is not a token record of format 1 or {FORMAT}")
    if meta["tokenizer"] != tokenizer:
        raise UserError(f"data.root={tokens} holds {meta['tokenizer']} tokens: set "
                        f"data.tokenizer={meta['tokenizer']}")
    _check(tokens, meta)
    # The ids alone train a model: GPT-2's BPE (tiktoken) is not needed to read them.
    tok = Tokenizer(meta["tokenizer"], int(meta["vocab_size"]), meta.get("chars", ""))
    return np.memmap(tokens, dtype=np.dtype(meta["dtype"]), mode="r",
                     shape=(int(meta["n_tokens"]),)), tok


def load_tokens(root: str | Path, tokenizer: str, pattern: str = "*.txt"
                ) -> tuple[np.memmap, Tokenizer]:
    """The token file of the text at ``root`` (built when missing or when the text changed),
    memory-mapped, and its tokenizer."""
    if tokenizer not in TOKENIZERS:
        raise UserError(f"data.tokenizer={tokenizer!r}: expected one of {', '.join(TOKENIZERS)}")
    root = Path(root).expanduser()
    if root.suffix == ".tokens" and root.is_file():
        tokens_, tok_ = load_prepared(root, tokenizer)
        _enough(root, int(tokens_.shape[0]))
        return tokens_, tok_
    files = text_files(root, pattern)
    fingerprint = _fingerprint(root, files)
    tokens, record = token_paths(root, tokenizer)
    tok = gpt2_tokenizer() if tokenizer == "gpt2" else Tokenizer(
        tokenizer, 256 if tokenizer == "byte" else 0)
    with file_lock(tokens.with_name(tokens.name + ".lock"), f"tokenizing {root}"):
        remove_stale_temporaries(tokens)
        meta = _read_record(record)
        if meta is None or meta.get("files") != fingerprint or meta.get("format") != FORMAT \
                or not tokens.is_file():
            if meta is not None and tokens.is_file():
                log.info("the text under %s changed since %s was made: tokenizing again",
                         root, tokens)
            meta = _build(root, files, tok, tokens, record, fingerprint)
        else:
            _check(tokens, meta)
    tok.chars, tok.vocab_size = meta["chars"], int(meta["vocab_size"])
    _enough(root, int(meta["n_tokens"]))
    return np.memmap(tokens, dtype=np.dtype(meta["dtype"]), mode="r",
                     shape=(int(meta["n_tokens"]),)), tok


def _enough(root: Path, n: int) -> None:
    if n < 2:
        raise DataError(f"data.root={root}: the text has {n} token(s)")


def _read_record(record: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(record.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DataError(f"{record} is not a readable token record ({type(e).__name__}); "
                        "delete it and its .tokens file to tokenize the text again") from None
    return meta if isinstance(meta, dict) else None


def _check(tokens: Path, meta: dict[str, Any]) -> None:
    """The token file is the one its record describes, byte for byte, and every id fits the
    vocabulary: else a one-line DataError, before any step trains on it."""
    dtype = np.dtype(meta["dtype"])
    expected = int(meta["n_tokens"]) * dtype.itemsize
    size = tokens.stat().st_size if tokens.is_file() else None
    if size != expected:
        raise DataError(f"token file {tokens} is corrupt ({size:,} bytes, its record says "
                        f"{expected:,}); delete it to tokenize the text again")
    step = int(meta.get("chunk_bytes", HASH_CHUNK))
    chunks, max_id = scan(tokens, dtype, chunk=step)
    if "chunk_sha256" in meta:
        bad = [i for i, (a, b) in enumerate(zip(chunks, meta["chunk_sha256"], strict=False))
               if a != b]
        if bad or len(chunks) != len(meta["chunk_sha256"]):
            where = (f"bytes {bad[0] * step:,} to {min(size, (bad[0] + 1) * step):,}"
                     if bad else "its chunk count")
            raise DataError(f"token file {tokens} is corrupt ({where} differ from its record's "
                            "checksum); delete it to tokenize the text again")
    else:  # a format-1 record: its edges alone were recorded
        if _edge_sha(tokens) != meta.get("edge_sha256"):
            raise DataError(f"token file {tokens} is corrupt (its checksum does not match its "
                            "record); delete it to tokenize the text again")
        log.warning("%s's record predates checksums of every byte: only its first and last "
                    "MiB could be checked; write it again (scripts/prepare_text.py) for a full "
                    "check", tokens)
    vocab = int(meta["vocab_size"])
    if max_id >= vocab:
        raise DataError(f"token file {tokens} holds id {max_id}, beyond its vocabulary of "
                        f"{vocab} ({meta.get('tokenizer')}): it is corrupt or was written "
                        "with another tokenizer")


class TokenSet:
    """A split of the token file: ``tokens[lo:hi]``. ``len()`` is the number of training
    windows an epoch takes (or the evaluation's windows for val and test)."""

    def __init__(self, tokens: np.memmap, lo: int, hi: int, block_size: int, windows: int,
                 device: torch.device) -> None:
        if hi - lo < block_size + 1:
            raise DataError(f"a split of {hi - lo} tokens is shorter than one window of "
                            f"model.block_size + 1 = {block_size + 1} tokens: use more text or "
                            "a smaller block")
        self.tokens, self.lo, self.hi = tokens, lo, hi
        self.block_size, self.windows, self.device = block_size, windows, device
        self.labels = torch.zeros(0)  # no per-sample labels (the targets are tokens)

    def __len__(self) -> int:
        return self.windows

    @property
    def image_size(self) -> int:
        return self.block_size

    def _batch(self, starts: np.ndarray) -> tuple[Tensor, Tensor]:
        idx = starts[:, None] + np.arange(self.block_size + 1)[None, :]
        w = torch.from_numpy(np.asarray(self.tokens[idx], dtype=np.int64))
        if self.device.type == "cuda":
            w = w.pin_memory().to(self.device, non_blocking=True)
        else:
            w = w.to(self.device)
        return w[:, :-1], w[:, 1:]

    def window_starts(self, aug_seed: int, positions: Tensor) -> np.ndarray:
        """The start of the window at each position of an epoch drawn with ``aug_seed``."""
        span = self.hi - self.lo - self.block_size
        return self.lo + (image_seeds(aug_seed, positions).numpy() % span)

    def train_batches(self, batch_size: int, drop_last: bool, start: int, aug_seed: int,
                      shard: tuple[int, int] | None) -> Iterator[tuple[Tensor, Tensor]]:
        n = self.windows
        stop = n - n % batch_size if drop_last else n
        rank, world = shard or (0, 1)
        for i in range(start * batch_size, stop, batch_size):
            positions = torch.arange(i, min(i + batch_size, n))
            lo, hi = positions.shape[0] * rank // world, positions.shape[0] * (rank + 1) // world
            yield self._batch(self.window_starts(aug_seed, positions[lo:hi]))

    def eval_batches(self, batch_size: int, shard: tuple[int, int] | None
                     ) -> Iterator[tuple[Tensor, Tensor]]:
        rank, world = shard or (0, 1)
        starts = self.lo + np.arange(self.windows) * self.block_size
        mine = starts[self.windows * rank // world:self.windows * (rank + 1) // world]
        for i in range(0, len(mine), batch_size):
            yield self._batch(mine[i:i + batch_size])

    def close(self) -> None:
        pass
