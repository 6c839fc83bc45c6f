"""Shared defaults of every run; dataset configs override them.

Every field can be set on the command line: --config.data.min_history=5.

A field added here must default to the behaviour from before it existed: a finished step whose
record lacks it is compared at that default (rsllm_jax/main.py), and reused.
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
    # No two candidates share a title (data/candidates.py): a generated title then names one
    # candidate. For catalogues where items share titles (synthetic items_per_title > 1).
    config.data.distinct_candidate_titles = False
    config.data.movielens_split = "llara"  # llara: LLaRA's val/test + rebuilt train; raw.
    config.data.movielens_titles = "clean"  # clean | llara (LLaRA's code, quirks included).
    config.data.movielens_min_rating = 3
    config.data.split_seed = 0  # User split when building splits from raw ratings.
    config.data.train_file = ""  # Another train file name than train_data.df.
    # The generator (rsllm_jax/data/synthetic.py): genre_titles puts the genre in every title;
    # items_per_title > 1 gives that many items of a genre one title (only their ids tell them
    # apart); world_users > 0 adds a "world" split with other transitions, for
    # config.pretrain.split.
    config.data.synthetic = ml_collections.ConfigDict(
        dict(seed=0, num_items=300, num_users=600, num_genres=10, min_length=6, max_length=30,
             genre_titles=False, items_per_title=1, world_users=0))

    # The conventional recommender (the `rec` step); sizes and training as in LLaRA.
    config.rec = ml_collections.ConfigDict()
    config.rec.model = "sasrec"  # gru4rec | caser | sasrec
    # bce: true item vs one sampled negative (LLaRA); ce: full softmax; bce_dros: bce plus DROS's
    # distributionally robust term (the training loop LLaRA adapted; recommenders/train.py).
    config.rec.loss = "bce"
    config.rec.dros_alpha = 0.1  # Weight of the DROS term.
    config.rec.dros_beta = 1.0  # Its temperature.
    config.rec.dros_gamma = 0.05  # Exponent of its popularity-based item weights.
    config.rec.seeds = "0,1,2,3,4"  # The paper reports the mean of 5 runs (§5.1).
    config.rec.init_from = ""  # A LLaRA checkpoint (*.pt) to import instead of training.
    config.rec.hidden_size = 64
    config.rec.max_len = 10
    config.rec.dropout = 0.1
    config.rec.num_heads = 1  # SASRec.
    config.rec.num_filters = 16  # Caser: filters per height.
    config.rec.filter_sizes = "2,3,4"  # Caser: horizontal filter heights.
    config.rec.learning_rate = 1e-3
    # L2, as torch.optim.Adam's weight_decay; < 0: the value LLaRA trained this model with
    # (SASRec 1e-4, GRU4Rec and Caser 1e-6; see recommenders/train.py, LLARA_WEIGHT_DECAY).
    config.rec.weight_decay = -1.0
    config.rec.batch_size = 256
    config.rec.eval_batch_size = 512
    # DROS (LLaRA's recommender training loop) runs a fixed 500 epochs and keeps the best
    # validation checkpoint. We stop after `patience` epochs without a better validation
    # HitRatio@1; val sets are tiny (LastFM 122 rows, MovieLens 94: steps of ~0.01) and plateau
    # for tens of epochs (LastFM GRU4Rec: 28 epochs between improvements), so patience is long.
    config.rec.max_epochs = 200
    config.rec.patience = 30
    config.rec.checkpoint_every = 1  # Epochs.
    # Early stopping maximises validation HitRatio@1 averaged over this many candidate draws
    # (the stored set + draws from their own seed streams; 1: the stored set only). LLaRA
    # redraws candidates at every evaluation; on 122 val rows one fixed set's HitRatio@1 jumps
    # by ~0.04 between epochs, and the epoch it picks is partly luck (LastFM GRU4Rec, 5 seeds,
    # 80 epochs: test HitRatio@1 0.2279 when picked on one set, 0.2426 on the mean of 20).
    config.rec.selection_draws = 20

    # The base LLM: a preset of rsllm_jax.models.llama.CONFIGS (random init, tokenizer trained
    # on the dataset: no download), a .gguf file, or a Hugging Face Llama directory.
    config.model = ml_collections.ConfigDict()
    config.model.name = "tiny"
    config.model.dtype = "bfloat16"  # Compute dtype; trainable parameters stay float32.
    # Storage dtype of the frozen base ("bfloat16" halves its memory: Llama-2-7B in 13.5 GB);
    # LoRA factors, projector and new token rows are always float32.
    config.model.param_dtype = "float32"
    config.model.scan_layers = False
    config.model.remat_policy = "none"
    config.model.lora_rank = 8  # LoRA as LLaRA: r 8, alpha 32, dropout 0.1, all projections.
    config.model.lora_alpha = 32.0
    config.model.lora_dropout = 0.1
    config.model.lora_targets = "q,k,v,o,gate,up,down"
    config.model.demo_vocab_size = 1000  # Tokenizer size for random-init presets.
    config.model.init_seed = 0

    # The device mesh of the LLM stages (rsllm_jax/parallel/layouts.py): a preset (single, data8,
    # fsdp8, data2_tensor4, pod32) or a shape "data,fsdp,tensor" with one -1 = the remaining
    # devices; rules map logical axes to mesh axes (fsdp_tp | data_parallel). Default: the batch
    # and every parameter sharded over all devices (FSDP); one device runs unchanged.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.preset = ""
    config.mesh.shape = "1,-1,1"
    config.mesh.rules = "fsdp_tp"

    # The `pretrain` step (rsllm_jax/training/pretrain.py): every parameter of the base trained
    # on the train prompts in the text format before the LoRA stages, which then read it as
    # their frozen base. For random-init presets, which cannot read a prompt; 0: off.
    config.pretrain = ml_collections.ConfigDict()
    config.pretrain.steps = 0
    config.pretrain.batch_size = 16
    config.pretrain.learning_rate = 1e-3
    config.pretrain.warmup_ratio = 0.05
    config.pretrain.weight_decay = 0.0
    config.pretrain.checkpoint_every = 100
    # The split whose text prompts it trains on: "train", or "world" (a synthetic dataset's
    # users with other transitions: the base learns titles and genres, not this data's
    # item-to-item transitions).
    config.pretrain.split = "train"

    config.prompts = ml_collections.ConfigDict()
    config.prompts.max_length = 1024  # Oldest history items are dropped to fit.
    config.prompts.iid_tokens = True  # One [IID<n>] token per item; False writes the digits.
    config.prompts.length_buckets = "256,384,512,768,1024"
    # Wrap each prompt in the tokenizer's chat template as a user message and answer in the
    # assistant's turn: how an instruction-tuned base (SmolLM2-Instruct) answers zero-shot.
    config.prompts.chat_template = False
    config.prompts.item_embeddings = ""  # Default: the rec step's table.
    # Paper §4.1.1 "pre-loading item embeddings": a fresh [IID<n>] token row starts as Proj(e_n)
    # of the recommender's item embedding (False: the Table 4 ablation, random rows).
    config.prompts.preload_iid_embeddings = True

    # Paper §5.1: Adam, lr 1e-5, warm-up 10 %, weight decay 1e-3, batch 256, gamma 0.3,
    # beta 0.4, tau 0.5 (Eq. 3-5).
    config.train = ml_collections.ConfigDict()
    config.train.learning_rate = 1e-5
    config.train.warmup_ratio = 0.1
    config.train.decay = "cosine"
    config.train.weight_decay = 1e-3
    config.train.grad_clip = 1.0
    # The projector's learning rate as a multiple of learning_rate (not in the paper: a lever on
    # the behavioural pathway, README, Results).
    config.train.projector_lr_scale = 1.0
    config.train.batch_size = 32  # Per step; accumulation_steps × batch_size = 256 (paper).
    config.train.accumulation_steps = 8
    config.train.gamma = 0.3  # L_I weight (Eq. 5).
    config.train.beta = 0.4  # L_U weight (Eq. 5).
    config.train.temperature = 0.5  # tau (Eq. 3, 4).
    config.train.symmetric_infonce = False  # Eq. 3/4 are one-directional.
    # Which epoch a stage keeps (training/selection.py): last | val_nip |
    # val_hit_ratio_at_1 (greedy answers, the paper's rule) | val_rank_hit_ratio_at_1.
    config.train.select_by = "val_hit_ratio_at_1"
    config.train.checkpoint_every = 200
    # Metrics leave the device (and the NaN check runs) every log_every steps, at validation
    # and at checkpoints; training/trainer.py.
    config.train.log_every = 20
    # Updates whose prompts are collated ahead in a background thread (0: in the loop).
    config.train.prefetch = 2
    # "a,b": a jax.profiler trace of steps a..b in <workdir>/<stage>/profile ("": none).
    config.train.profile_steps = ""

    config.stage1 = ml_collections.ConfigDict()
    config.stage1.item_format = "text_id"  # Paper §4.1.1.
    config.stage1.epochs = 3  # Paper: at most 3 epochs in stage 1.
    config.stage1.max_steps = 0  # Stop earlier than `epochs` (0: no cap), for smoke runs.
    # LLaRA's curriculum: an item format (e.g. "text") that each example uses instead of
    # item_format with probability 1 - step / (total_steps - 1), i.e. from all `curriculum_from`
    # at the first step to all `item_format` at the last; "": no curriculum.
    config.stage1.curriculum_from = ""

    config.stage2 = ml_collections.ConfigDict()
    config.stage2.item_format = "hybrid"  # Paper §4.1.2.
    config.stage2.epochs = 3
    config.stage2.max_steps = 0
    config.stage2.curriculum_from = ""
    config.stage2.init_from_stage1 = True  # False: the "stage 2 only" ablation.

    # The `eval` step (rsllm_jax/evaluation/evaluate.py): ValidRatio/HitRatio@1 by the paper's
    # rule and a strict one, constrained decoding, candidate ranking by likelihood.
    config.eval = ml_collections.ConfigDict()
    config.eval.split = "test"
    config.eval.stage = "auto"  # auto | base (zero-shot) | stage1 | stage2
    config.eval.item_format = ""  # Default: the stage's format ("text" for base).
    config.eval.batch_size = 8
    config.eval.max_new_tokens = 64  # Answers are a title: only a model that never stops hits it.
    config.eval.constrained = True  # Also decode restricted to the candidates' titles.
    config.eval.ranking = True  # Also rank the candidates by their likelihood.
    # > 0: also rank the whole catalogue (HitRatio@10, NDCG@10), by the recommender alone and by
    # its top retrieve_k items re-ranked by the LLM (evaluation/catalogue_ranking.py).
    config.eval.retrieve_k = 0
    return config
