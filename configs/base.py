"""Shared defaults of every run; dataset configs override them.

Every field can be set on the command line: --config.data.min_history=5.
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    # Pipeline steps to run, in order (see rsllm_jax/main.py); each skips itself when done.
    config.jobs = "prepare"
    config.workdir = "runs/default"  # --workdir overrides it.
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "lastfm"  # lastfm | movielens | steam | synthetic
    config.data.source = ""  # Folder with the raw LLaRA-format files.
    config.data.dir = ""  # Prepared data; default <workdir>/data.
    config.data.min_history = 3  # LLaRA drops rows with len_seq < 3.
    config.data.candidate_seed = 0  # Fixes the 20 val/test candidates of every row.
    config.data.exclude_empty_titles = True  # Never draw empty-title items as negatives.
    config.data.movielens_split = "llara"  # llara: LLaRA's val/test + rebuilt train; raw.
    config.data.movielens_titles = "clean"  # clean | llara (LLaRA's code, quirks included).
    config.data.movielens_min_rating = 3
    config.data.split_seed = 0  # User split when building splits from raw ratings.
    config.data.train_file = ""  # Another train file name than train_data.df.
    config.data.synthetic = ml_collections.ConfigDict(dict(
        seed=0, num_items=300, num_users=600, num_genres=10, min_length=6, max_length=30))

    # The conventional recommender (the `rec` step); sizes and training as in LLaRA.
    config.rec = ml_collections.ConfigDict()
    config.rec.model = "sasrec"  # gru4rec | caser | sasrec
    config.rec.loss = "bce"  # bce: true item vs one sampled negative (LLaRA); ce: full softmax.
    config.rec.seeds = "0,1,2,3,4"  # The paper reports the mean of 5 runs (§5.1).
    config.rec.init_from = ""  # A LLaRA checkpoint (*.pt) to import instead of training.
    config.rec.hidden_size = 64
    config.rec.max_len = 10
    config.rec.dropout = 0.1
    config.rec.num_heads = 1  # SASRec.
    config.rec.num_filters = 16  # Caser: filters per height.
    config.rec.filter_sizes = "2,3,4"  # Caser: horizontal filter heights.
    config.rec.learning_rate = 1e-3
    config.rec.weight_decay = 1e-6  # L2, as torch.optim.Adam's weight_decay.
    config.rec.batch_size = 256
    config.rec.eval_batch_size = 512
    config.rec.max_epochs = 200
    config.rec.patience = 20  # Epochs without a better validation HitRatio@1 before stopping.
    config.rec.checkpoint_every = 1  # Epochs.
    return config
