"""The miniature world where items share titles: only the ids tell them apart.

  python -m rsllm_jax.experiments --config configs/shared_titles.py \
      --rows zero_shot,tallrec,rsllm --seeds 0,1,2 --llm_steps 1000 --out DIR

configs/miniature.py with 90 items in 3 genres and every title shared by 3 items of one genre,
drawn at random (data/synthetic.py, items_per_title): a title carries the genre, and an item's
successor depends on which of its title's items it is, which the ids (the recommender, and the
behavioural tokens read from it) know and the titles do not. No two candidates share a title
(config.data.distinct_candidate_titles), so an answer still names one candidate.
`python benchmarks/title_ceiling.py --data DIR/shared/data` computes what a predictor that
knows the generator can reach from the ids and from the titles alone. README, Results, says
what it shows.
"""

from configs import miniature, presets


def get_config(preset=presets.DEFAULT):
    """The config of preset `preset` (configs/presets.py) on the shared-titles dataset."""
    config = miniature.get_config(preset)
    config.workdir = config.workdir.replace("runs/miniature", "runs/shared_titles", 1)
    # 30 titles of 3 items: the 20 candidates of a row need 20 distinct titles outside its
    # history; 60 items in 20 titles leave some rows short of them.
    config.data.synthetic.num_items = 90
    config.data.synthetic.items_per_title = 3
    config.data.distinct_candidate_titles = True
    return config
