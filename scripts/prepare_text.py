"""A Hugging Face data set's texts into the token file ``data=text`` trains on, as
karpathy/nanoGPT's ``data/openwebtext/prepare.py`` (GPT-2's BPE, an end-of-text token after
each document, uint16 ids), with the record ``swa_research.data.text`` checks it against::

    pip install 'swa_research[lm]' datasets
    python scripts/prepare_text.py --dataset openwebtext --out ~/data/owt/openwebtext.gpt2.tokens
    python -m swa_research.train experiment=lm/gpt2_owt data.root=~/data/owt/openwebtext.gpt2.tokens

    # FineWeb's 10B-token sample, streamed (never all on disk as text):
    python scripts/prepare_text.py --dataset HuggingFaceFW/fineweb --name sample-10BT \\
        --streaming --out ~/data/fineweb10b.gpt2.tokens
    # Local text files through the same path:
    python scripts/prepare_text.py --dataset text --data-files 'corpus/*.txt' \\
        --out corpus.gpt2.tokens

The splits come from the file: ``data.val_fraction`` and ``data.test_fraction`` are taken from
its end (nanoGPT holds out 0.05% of OpenWebText for validation). ``datasets`` downloads the data
set on first use (OpenWebText: 54 GB of text, about 9B GPT-2 tokens, a 17 GB token file) and
tiktoken GPT-2's BPE files: a machine without a network stops with one line saying which.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swa_research.config import UserError  # noqa: E402
from swa_research.data.text import write_token_file  # noqa: E402


def load(args: argparse.Namespace):  # noqa: ANN201  (a datasets.Dataset or IterableDataset)
    try:
        import datasets
    except ImportError:
        raise UserError("scripts/prepare_text.py needs the datasets package: pip install "
                        "datasets") from None
    kwargs = {"split": args.split, "streaming": args.streaming}
    if args.data_files:
        # Local files: a pattern that matches nothing is named here, not blamed on the Hub.
        for pattern in args.data_files:
            if "://" not in pattern and not glob.glob(os.path.expanduser(pattern),
                                                      recursive=True):
                raise UserError(f"--data-files {pattern!r}: no file matches it")
        kwargs["data_files"] = args.data_files
    try:
        return datasets.load_dataset(args.dataset, args.name, **kwargs)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"cannot load data set {args.dataset!r} ({type(e).__name__}: "
                        f"{first[:200]}); datasets downloads it once from the Hugging Face Hub: "
                        "this machine must reach it, or have it in its cache") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="a Hugging Face data set, e.g. openwebtext")
    p.add_argument("--name", default=None, help="its configuration (FineWeb: sample-10BT)")
    p.add_argument("--split", default="train")
    p.add_argument("--data-files", nargs="*", default=None,
                   help="local files (with --dataset text or json)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--tokenizer", default="gpt2", choices=("gpt2", "byte"))
    p.add_argument("--streaming", action="store_true",
                   help="read the data set as a stream instead of downloading it whole")
    p.add_argument("--limit", type=int, default=0, help="at most this many documents (0: all)")
    p.add_argument("--out", required=True, type=Path, help="the token file, NAME.tokens")
    args = p.parse_args(argv)
    try:
        dataset = load(args)
        column = args.text_column

        def documents():  # noqa: ANN202
            for i, row in enumerate(dataset):
                if args.limit and i >= args.limit:
                    return
                if column not in row:
                    raise UserError(f"--text-column {column}: the data set's columns are "
                                    f"{', '.join(row)}")
                yield row[column]

        t0, last = time.monotonic(), [0.0]

        def progress(docs: int, tokens: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 10:
                last[0] = now
                print(f"{docs:,} documents, {tokens:,} tokens, "
                      f"{tokens / max(now - t0, 1e-9):,.0f} tokens/s", flush=True)

        meta = write_token_file(documents(), args.tokenizer, args.out,
                                source={"dataset": args.dataset, "name": args.name,
                                        "split": args.split, "text_column": column,
                                        "data_files": args.data_files},
                                progress=progress)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {meta['n_tokens']:,} {meta['tokenizer']} tokens from "
          f"{meta['source']['documents']:,} documents in {time.monotonic() - t0:.0f} s; train on "
          f"it with data.root={args.out} data.tokenizer={meta['tokenizer']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
