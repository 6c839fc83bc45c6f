"""The demo: every pipeline step on a generated dataset, in minutes on a laptop CPU."""

from configs import base


def get_config():
    config = base.get_config()
    config.jobs = "prepare,rec"
    config.workdir = "runs/demo"
    config.data.name = "synthetic"
    # One seed, a few epochs: enough for the recommender to beat random ranking clearly.
    config.rec.seeds = "0"
    config.rec.max_epochs = 5
    config.rec.patience = 2
    return config
