"""The demo: every pipeline step on a generated dataset, in minutes on a laptop CPU."""

from configs import base, presets


def get_config(preset=presets.DEFAULT):
    """The config of preset `preset` (configs/presets.py) on this dataset."""
    config = base.get_config()
    config.workdir = "runs/demo"
    config.data.name = "synthetic"
    # One seed, a few epochs: enough for the recommender to beat random ranking clearly.
    config.rec.seeds = "0"
    config.rec.max_epochs = 5
    config.rec.patience = 2
    # A tiny random-init Llama, a few dozen steps per stage: the whole method runs end to end
    # in minutes on a laptop CPU (it does not have time to learn much).
    config.model.name = "tiny"
    # On a CPU the tiny model's step is ~2x faster in float32 than in bf16, and LoRA dropout's
    # random masks cost as much as the model (benchmarks/stage2_cpu.py, README Performance).
    config.model.dtype = "float32"
    config.model.lora_dropout = 0.0
    config.train.batch_size = 16
    config.train.accumulation_steps = 1
    config.train.learning_rate = 1e-3
    config.train.log_every = 10
    config.train.checkpoint_every = 20
    config.stage1.max_steps = 40
    config.stage2.max_steps = 40
    config.train.select_by = "last"  # 40 steps are less than an epoch: one validation.
    return presets.apply_preset(config, preset)
