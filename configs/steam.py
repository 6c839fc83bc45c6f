"""steam: LLaRA's split of the paper's steam dataset (see README, "Data")."""

from configs import base, presets


def get_config(preset=presets.DEFAULT):
    """The config of preset `preset` (configs/presets.py) on this dataset."""
    config = base.get_config()
    config.workdir = "runs/steam"
    config.data.name = "steam"
    config.data.source = "data/steam"
    return presets.apply_preset(config, preset)
