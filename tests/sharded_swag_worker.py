"""One rank of tests/test_fsdp.py::test_sharded_swag_equals_one_process (run under torchrun):
SWAG, SWAG-Diagonal and FGE of a fully_shard'ed model against the same averages of the model
whole, fed the same points.
Rank 0 writes the largest differences found to the JSON file named by argv[1].

The points are whole state dicts drawn from one seed on every rank; the sharded model gets its
slice of each through torch's own distribute_tensor (not the code under test)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor

from swa_research import distributed
from swa_research.averaging import make_average, swag_bma


def local_of(whole: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).to_local()


def main() -> None:
    distributed.setup()  # the project's world (rank, size) over torchrun's process group
    out, folder = Path(sys.argv[1]), Path(sys.argv[2])
    torch.manual_seed(0)
    # Rows of 12, 12 and 3: the last splits unevenly (2 and 1) over two ranks.
    model = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 12), nn.GELU(),
                          nn.Linear(12, 3))
    whole = copy.deepcopy(model)
    for i in (0, 2, 4):
        fully_shard(model[i])
    fully_shard(model)
    g = torch.Generator().manual_seed(1)
    points = [{k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in
               whole.state_dict().items()} for _ in range(7)]
    x = torch.randn(40, 6, generator=g)
    worst: dict[str, float] = {}

    def note(key: str, a: torch.Tensor, b: torch.Tensor) -> None:
        assert a.shape == b.shape, (key, a.shape, b.shape)
        if not a.numel():
            worst.setdefault(key, 0.0)
            return
        worst[key] = max(worst.get(key, 0.0), (a.float() - b.float()).abs().max().item())

    def feed(sharded: Any, one: Any) -> None:
        """Every point into both averages: whole into one, each rank's slice into the other."""
        for point in points:
            whole.load_state_dict(point)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.to_local().copy_(local_of(point[name], p))
            sharded.update(model)
            one.update(whole)

    for method in ("swag", "swag_diag"):
        sharded = make_average(method, model, max_models=5, samples=4)
        one = make_average(method, whole, max_models=5, samples=4)
        feed(sharded, one)
        kept = [p.to_local().clone() for p in model.parameters()]
        # A sample: each rank's slice of the one-process sample, parameter by parameter.
        mine = sharded.sample(torch.Generator().manual_seed(3))
        theirs = one.sample(torch.Generator().manual_seed(3))
        pieces = torch.split(theirs, [p.numel() for p in whole.parameters()])
        expect = torch.cat([local_of(piece.view_as(p), q).reshape(-1) for piece, p, q in
                            zip(pieces, whole.parameters(), model.parameters(), strict=True)])
        note(f"{method}.sample", mine, expect)
        # The Bayesian model average through the sharded model, against one process's.
        got = swag_bma(sharded, lambda: [x], seed=5)
        want = swag_bma(one, lambda: [x], seed=5)
        note(f"{method}.bma", got, want)
        worst[f"{method}.restored"] = max((a - p.to_local()).abs().max().item()
                                          for a, p in zip(kept, model.parameters(),
                                                          strict=True))
        # The whole files: swag.pt's state dict and posterior.
        full = sharded.full_state_dict()
        ref = one.module.state_dict()
        note(f"{method}.state_dict", torch.cat([full[k].reshape(-1) for k in ref]),
             torch.cat([ref[k].reshape(-1) for k in ref]))
        a, b = sharded.export()["swag"], one.export()["swag"]
        for key in ("mean", "sq_mean", "deviations"):
            assert a[key].shape == b[key].shape, (method, key, a[key].shape, b[key].shape)
            note(f"{method}.export", a[key], b[key])
        worst[f"{method}.bytes_share"] = sharded.nbytes() / sharded.whole_nbytes()
        # A sharded checkpoint's round trip (torch.distributed.checkpoint), then one more point.
        path = folder / method
        dcp.save({"t": sharded.tensors()}, checkpoint_id=str(path))
        meta = sharded.meta()
        again = make_average(method, model, max_models=5, samples=4)
        again.load_meta(meta)
        dcp.load({"t": again.tensors(meta["ring"])}, checkpoint_id=str(path))
        for avg in (sharded, again):
            avg.update(model)
        note(f"{method}.resumed", again.sample(torch.Generator().manual_seed(9)),
             sharded.sample(torch.Generator().manual_seed(9)))
    # FGE: the members sharded, the ensemble through the model.
    fge = make_average("fge", model, max_models=3)
    one = make_average("fge", whole, max_models=3)
    feed(fge, one)
    kept = [p.to_local().clone() for p in model.parameters()]
    note("fge.probs", fge.ensemble_probs("x", lambda: [x], len(x)),
         one.ensemble_probs("x", lambda: [x], len(x)))
    note("fge.predict", fge.predict(x), one.predict(x))
    worst["fge.restored"] = max((a - p.to_local()).abs().max().item()
                                for a, p in zip(kept, model.parameters(), strict=True))
    mine, theirs = fge.export()["members"], one.export()["members"]
    assert len(mine) == len(theirs) == 3
    for a, b in zip(mine, theirs, strict=True):
        note("fge.members", torch.cat([a[k].reshape(-1) for k in b]),
             torch.cat([b[k].reshape(-1) for k in b]))
    worst["fge.bytes_share"] = fge.nbytes() / fge.whole_nbytes()
    dcp.save({"t": fge.tensors()}, checkpoint_id=str(folder / "fge"))
    meta = fge.meta()
    again = make_average("fge", model, max_models=3)
    again.load_meta(meta)
    dcp.load({"t": again.tensors(meta["ring"])}, checkpoint_id=str(folder / "fge"))
    note("fge.resumed", again.ensemble_probs("x", lambda: [x], len(x)),
         one.ensemble_probs("x", lambda: [x], len(x)))
    # The trainer's evaluation split over the ranks under FSDP: 37 images in slices of 18 and
    # 19; in batches of 5 both ranks run 4, in batches of 6 one runs 3 and repeats one
    # (uncounted) to match the other's 4. Both against one process over the whole set.
    from swa_research.data import ImageSet, Preprocess
    from swa_research.training.evaluation import evaluate

    g = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (37, 1, 2, 3), dtype=torch.uint8, generator=g)
    data = ImageSet(images, torch.randint(0, 3, (37,), generator=g))
    pre = Preprocess(False, [0.0], [1.0], torch.device("cpu"))
    flat = nn.Flatten()
    shard_net, whole_net = nn.Sequential(flat, model), nn.Sequential(flat, whole)
    for bs in (5, 6):
        got = evaluate(shard_net, data, pre, bs)
        distributed._WORLD, kept_world = distributed.World(), distributed._WORLD
        want = evaluate(whole_net, data, pre, bs)  # one process: the whole set
        distributed._WORLD = kept_world
        for key in ("loss", "acc"):
            worst[f"eval.{key}.{bs}"] = abs(got[key] - want[key])
    if dist.get_rank() == 0:
        out.write_text(json.dumps(worst))
    distributed.teardown()


if __name__ == "__main__":
    main()
