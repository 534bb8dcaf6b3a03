"""Hydra config groups. A regular package (not a namespace one) so that Hydra finds it as
``pkg://swa_research.conf``: from the ``swa-train`` script and ``initialize_config_module``."""
