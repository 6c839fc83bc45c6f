"""movielens: LLaRA's split of the paper's movielens dataset (see README, "Data")."""

from configs import base


def get_config():
    config = base.get_config()
    config.workdir = "runs/movielens"
    config.data.name = "movielens"
    config.data.source = "data/movielens"
    return config
