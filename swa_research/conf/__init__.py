"""Hydra config groups. A regular package (not a namespace one) so that Hydra finds it as
``pkg://swa_research.conf``: from the ``swa-train`` script and ``initialize_config_module``.

Registering the structured schema happens here, where Hydra reads the configs (Hydra imports
this package first), and nowhere in the library: the library takes composed configs.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from swa_research.config import Config

CONF_DIR = Path(__file__).parent


def register_configs() -> None:
    """The schema conf/config.yaml builds on; a ``model=NAME`` option for every registered
    model and a ``task=NAME`` option for every registered task without a yaml file of its own
    (each is one file and a registry line; call this again after registering one); the
    ``swa_gpu_count`` resolver of conf/hydra/launcher/local_gpus.yaml."""
    from swa_research.models import MODELS, model_options
    from swa_research.tasks import TASKS

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for name in MODELS:
        if not (CONF_DIR / "model" / f"{name}.yaml").is_file():
            # The builder's options with their defaults: model.OPTION=... overrides them.
            cs.store(group="model", name=name, node={
                "name": name, **{k: p.default for k, p in model_options(name).items()}})
    for name in TASKS:  # likewise a task=NAME option for every registered task
        if not (CONF_DIR / "task" / f"{name}.yaml").is_file():
            cs.store(group="task", name=name, node={"name": name})
    if not OmegaConf.has_resolver("swa_gpu_count"):
        OmegaConf.register_new_resolver("swa_gpu_count", visible_gpu_count)


def visible_gpu_count() -> int:
    """CUDA GPUs this process sees (CUDA_VISIBLE_DEVICES applies); at least 1."""
    import torch

    return max(1, torch.cuda.device_count())


register_configs()
