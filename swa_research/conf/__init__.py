"""Hydra config groups. A regular package (not a namespace one) so that Hydra finds it as
``pkg://swa_research.conf``: from the ``swa-train`` script and ``initialize_config_module``."""

from swa_research.config import register_configs

# config.yaml builds on the structured schema: register it wherever these configs are read
# (Hydra imports this package before it reads them), not only from swa_research.train.
register_configs()
