"""lastfm: LLaRA's split of the paper's lastfm dataset (see README, "Data")."""

from configs import base


def get_config():
    config = base.get_config()
    config.workdir = "runs/lastfm"
    config.data.name = "lastfm"
    config.data.source = "data/lastfm"
    return config
