"""The paper's Table 2 and Table 4 in miniature: the demo's world, measured on 200 users.

  python -m rsllm_jax.experiments --config configs/miniature.py \
      --rows zero_shot,tallrec,llara,rsllm --seeds 0,1,2 --llm_steps 1000 --out DIR

The demo's catalogue (60 items in 3 genres) and tiny pre-trained base, with 2,000 users instead
of 600 (200 val and 200 test rows: one test row moves HitRatio@1 by 0.005, not 0.017) and titles
that start with their genre's word (data/synthetic.py): the titles carry the genre, only the
interactions carry the item-to-item transitions. README, Results, says what it shows and why.
"""

from configs import demo, presets


def get_config(preset=presets.DEFAULT):
    """The config of preset `preset` (configs/presets.py) on the miniature dataset."""
    config = demo.get_config(preset)
    config.workdir = config.workdir.replace("runs/demo", "runs/miniature", 1)
    config.data.synthetic.num_users = 2000
    config.data.synthetic.genre_titles = True
    # The rows train for --llm_steps (1000) steps: at that length 1e-3 and the demo's 3e-3
    # end alike (README, Results: the behavioural pathway in isolation).
    config.train.learning_rate = 1e-3
    return config
