"""The demo: every pipeline step on a generated dataset, in minutes on a laptop CPU."""

from configs import base, presets


def get_config(preset=presets.DEFAULT):
    """The config of preset `preset` (configs/presets.py) on this dataset."""
    config = base.get_config()
    config.workdir = "runs/demo"
    config.data.name = "synthetic"
    # A small catalogue (60 items in 3 genres): the tiny model sees each item often enough to
    # learn its successors within the demo's few hundred steps. Chance is still 1/20.
    config.data.synthetic.num_items = 60
    config.data.synthetic.num_genres = 3
    # One seed, a few epochs: enough for the recommender to beat random ranking clearly.
    config.rec.seeds = "0"
    config.rec.max_epochs = 5
    config.rec.patience = 2
    # A tiny random-init Llama. It cannot read a prompt, so the `pretrain` step first trains
    # all its parameters on the text prompts (README, Results: without it the LoRA stages
    # answer the same title for every row); then 200 LoRA steps per stage.
    config.model.name = "tiny"
    # On a CPU the tiny model's step is ~2x faster in float32 than in bf16, and LoRA dropout's
    # random masks cost as much as the model (benchmarks/stage2_cpu.py, README Performance).
    config.model.dtype = "float32"
    config.model.lora_dropout = 0.0
    config.pretrain.steps = 800
    # Its prompts are 120-190 tokens: buckets that fit them halve the padding of the default.
    config.prompts.length_buckets = "160,192,256,384,512,768,1024"
    config.train.batch_size = 16
    config.train.accumulation_steps = 1
    # The new tokens ([DSR], [IID<n>], behavioural tokens) first disturb the pre-trained base;
    # 100 LoRA steps per stage at 1e-3 left RSLLM below its base (ranking HitRatio@1 0.38
    # against 0.45), 200 at 3e-3 put it above (0.47-0.50). README, Results.
    config.train.learning_rate = 3e-3
    config.train.log_every = 10
    config.train.checkpoint_every = 20
    config.stage1.max_steps = 200
    config.stage2.max_steps = 200
    config.train.select_by = "last"  # 200 steps are less than an epoch: one validation.
    return presets.apply_preset(config, preset)
