"""The item formats of each stage and LLaRA's curriculum between two of them."""

import numpy as np

from rsllm_jax import run_paths
from rsllm_jax.prompts import templates


def item_formats(config):
    """Every item format of the run: the stages' formats, then their curriculum start formats
    (after, so a run without a curriculum keeps its token ids)."""
    formats = [config.stage1.item_format, config.stage2.item_format]
    return formats + [
        config[stage].curriculum_from for stage in run_paths.STAGES if config[stage].curriculum_from
    ]


def stage_formats(config, stage):
    """The item formats one stage trains on: its own, and its curriculum's start format."""
    stage_config = config[stage]
    start = stage_config.curriculum_from
    return [stage_config.item_format
            ] + ([start] if start and start != stage_config.item_format else [])


def preloads_iid_rows(config, stage):
    """Whether this stage initialises the [IID<n>] rows from the projected recommender table:
    it trains on prompts with IID tokens (text-ID or IID-only) from freshly initialised
    parameters."""
    fresh = stage == "stage1" or not config.stage2.init_from_stage1
    return (config.prompts.preload_iid_embeddings and config.prompts.iid_tokens and fresh
            and bool(set(templates.IID_FORMATS) & set(stage_formats(config, stage))))


# LLaRA's curriculum.

# Mixed into the curriculum's random stream so it never coincides with another use of the seed.
_CURRICULUM_SALT = 0x11A7A


def curriculum_probability(step, total_steps):
    """The probability that an example of `step` (0-based) uses the stage's item format rather
    than `curriculum_from`: linear from 0 at the first step to 1 at the last step of the stage.

    LLaRA's curriculum prompt tuning raises this probability from text-only to hybrid prompts;
    its code counts steps within the epoch, so the ramp restarts every epoch. Here it spans the
    whole stage (`total_steps` is the stage's step count, max_steps included).
    """
    if total_steps <= 1:
        return 1.0
    return min(max(step / (total_steps - 1), 0.0), 1.0)


def curriculum_choices(seed, step, row_ids, total_steps):
    """For each row id, True when its example at `step` uses the stage's item format.

    Each draw is a uniform number from the stream of (seed, step, row id), so a run killed and
    resumed (it restores the step and the data order) makes the same choices, and so does any
    process count.
    """
    p = curriculum_probability(step, total_steps)
    draws = [
        np.random.default_rng([_CURRICULUM_SALT, int(seed),
                               int(step), int(row)]).random() for row in row_ids
    ]
    return np.asarray(draws) < p
