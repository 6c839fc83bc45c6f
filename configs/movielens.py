"""movielens: LLaRA's split of the paper's movielens dataset (see README, "Data")."""

from configs import base, presets


def get_config(preset=presets.DEFAULT):
    """The config of preset `preset` (configs/presets.py) on this dataset."""
    config = base.get_config()
    config.workdir = "runs/movielens"
    config.data.name = "movielens"
    config.data.source = "data/movielens"
    return presets.apply_preset(config, preset)
