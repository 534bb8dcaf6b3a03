"""A torch/torchvision pair that does not work together is one line at start, naming the
installed versions and the pair to install (swa_research/versions.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from swa_research.versions import matching_torchvision, pair_problem, require_torch_pair


def test_the_pairs_follow_torchvisions_table() -> None:
    assert matching_torchvision("2.14.1") == "0.29"
    assert matching_torchvision("2.11.0+cu126") == "0.26"
    assert matching_torchvision("2.4.0") == "0.19"
    assert matching_torchvision("1.13.1") is None


def test_problems_are_named_with_the_pair_to_install() -> None:
    assert pair_problem("2.14.1", "0.29.1", None) is None
    assert pair_problem("2.11.0+cu126", "0.26.0+cu126", None) is None
    msg = pair_problem("2.14.1+cpu", "0.29.1+cu126",
                       RuntimeError("operator torchvision::nms does not exist\nmore"))
    assert msg == ("the two are different builds (cpu and cu126); importing torchvision failed "
                   "(RuntimeError: operator torchvision::nms does not exist); install a matching "
                   "pair, e.g. pip install torch==2.14.1 torchvision==0.29.*")
    assert pair_problem("2.11.0", "0.29.1", None).startswith(
        "torchvision 0.29.1 is not the release for torch 2.11.0 (that is torchvision 0.26.*)")
    assert pair_problem("2.14.1", None, None).startswith("torchvision is not installed")


def test_the_installed_pair_works() -> None:
    require_torch_pair()


def test_the_command_line_says_it_in_one_line(tmp_path: Path) -> None:
    """A torchvision whose import fails as a CPU torch beside a CUDA torchvision does: said in
    one line where a run first needs it (CIFAR here); a run that needs no torchvision (a
    language model, synthetic images) never imports it."""
    fake = tmp_path / "fake" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "swa_research.train", "experiment=smoke",
                        "data=cifar10", f"data.root={tmp_path / 'data'}", "logger=none"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: importing torchvision failed "
                                                   "(RuntimeError: operator torchvision::nms")
    base = torch.__version__.split("+")[0]
    assert f"pip install torch=={base} torchvision==" in lines[0]
    assert not list(tmp_path.glob("outputs/**/metrics.json")) or "finished" not in "".join(
        p.read_text() for p in tmp_path.glob("outputs/**/metrics.json"))
