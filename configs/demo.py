"""The demo: every pipeline step on a generated dataset, in minutes on a laptop CPU."""

from configs import base


def get_config():
    config = base.get_config()
    config.workdir = "runs/demo"
    config.data.name = "synthetic"
    return config
