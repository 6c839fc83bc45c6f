"""steam: LLaRA's split of the paper's steam dataset (see README, "Data")."""

from configs import base


def get_config():
    config = base.get_config()
    config.workdir = "runs/steam"
    config.data.name = "steam"
    config.data.source = "data/steam"
    return config
