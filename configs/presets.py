"""Named experiment presets: one per baseline row of the paper's Table 2 and ablation of Table 4.

Select one after the config file's name: `--config configs/lastfm.py:tallrec` (ml_collections
passes the text after ':' to the file's `get_config`). Without one a dataset config is `rsllm`.
Each preset is a function that edits a dataset's config in place; `apply_preset` runs it last,
so it knows the dataset (LLaRA's optimiser settings differ per dataset) and command-line
overrides (`--config.rec.model=gru4rec`, `--config.stage1.max_steps=4`) still apply after it.
Presets never touch `config.rec`: the recommender behind the behavioural tokens is orthogonal.

Where each recipe (optimiser, epochs, loss weights) comes from:
  rsllm, and every ablation of Table 4    the paper's §5.1: Adam, lr 1e-5, 10 % warm-up, weight
                                          decay 1e-3, batch 256, γ 0.3, β 0.4, τ 0.5, 3 epochs
                                          per stage (configs/base.py)
  zero_shot                               no training
  tallrec, llara                          LLaRA's training scripts, per dataset (batch, lr,
                                          5 % warm-up then cosine, 5 epochs): the paper copies
                                          both rows from LLaRA's experiments, which trained them
                                          so (LLARA_OPTIMISER)
  tallrec_rsllm_optim, rsllm_llara_optim  ours: each method under the other's optimiser, to
                                          separate the method from its recipe
The ablations that the paper describes in one sentence have two readings, each a preset:
`wo_text` / `wo_text_both_stages` and `wo_iid_tokens` / `wo_iid_tokens_text_stage1`.

Stages are skipped through `config.jobs`. Every preset other than `rsllm` writes to its own
`<workdir>-<preset>` folder, so one dataset's rows never refuse each other's finished steps
(`--workdir` still overrides it).
"""

from rsllm_jax import run_paths

DEFAULT = "rsllm"

# LLaRA's training scripts per dataset: (micro-batch size, gradient-accumulation steps, peak
# learning rate); Adam with linear warm-up over 5 % of the updates then cosine decay, 5 epochs.
LLARA_OPTIMISER = {
    "lastfm": (8, 16, 7e-4),
    "movielens": (8, 16, 8e-4),
    "steam": (4, 32, 5e-4),
}
LLARA_WARMUP_RATIO = 0.05
LLARA_EPOCHS = 5


def _set_jobs(config, stages, rec=True):
    """prepare, the recommender (when behavioural tokens or pre-loading need its table), the
    base's pre-training when configured, the given LLM stages, and the evaluation step."""
    pretrain = ["pretrain"] if config.pretrain.steps > 0 else []
    steps = ["prepare"] + (["rec"] if rec else []) + pretrain + list(stages) + ["eval"]
    unknown = set(steps) - set(run_paths.STEP_NAMES)
    assert not unknown, f"not pipeline steps: {unknown}"
    config.jobs = ",".join(steps)


def _llara_optimiser(config):
    """LLaRA's optimiser settings for config.data.name. Datasets LLaRA never ran (the
    synthetic demo) keep their batch and learning rate and take only the schedule."""
    if config.data.name in LLARA_OPTIMISER:
        batch, accumulation, learning_rate = LLARA_OPTIMISER[config.data.name]
        config.train.batch_size = batch
        config.train.accumulation_steps = accumulation
        config.train.learning_rate = learning_rate
    config.train.warmup_ratio = LLARA_WARMUP_RATIO
    config.train.decay = "cosine"


# --- baselines and the method (paper Table 2) ----------------------------------------------------


def rsllm(config):
    """RSLLM (paper §4, Algorithm 1): stage 1 on text-ID prompts, stage 2 from stage 1 on hybrid
    prompts, L = L_NIP + γ·L_I + β·L_U (Eq. 5), with the paper's optimiser (§5.1)."""
    config.stage1.item_format = "text_id"
    config.stage2.item_format = "hybrid"
    _set_jobs(config, ["stage1", "stage2"])


def zero_shot(config):
    """The base LLM zero-shot ("Llama2" row of Table 2): text-only prompts, no training."""
    config.stage1.item_format = "text"
    config.stage2.item_format = "text"
    if "eval" in config:  # The base LLM, even in a workdir where a stage was trained.
        config.eval.stage = "base"
    _set_jobs(config, [], rec=False)


def tallrec_rsllm_optim(config):
    """TALLRec (LoRA on text-only prompts, the language-modelling loss NIP only, one stage)
    trained with RSLLM's optimiser and epochs (§5.1: lr 1e-5, 3 epochs), which under-trains it
    next to LLaRA's recipe."""
    config.stage1.item_format = "text"
    config.stage2.item_format = "text"
    config.train.gamma = 0.0
    config.train.beta = 0.0
    _set_jobs(config, ["stage1"], rec=False)


def tallrec(config):
    """TALLRec as the paper's Table 2 row was trained (in LLaRA's experiments, which the paper
    copies): LoRA on text-only prompts, NIP only, one stage, with LLaRA's per-dataset optimiser
    and 5 epochs."""
    tallrec_rsllm_optim(config)
    config.stage1.epochs = LLARA_EPOCHS
    _llara_optimiser(config)


def llara(config):
    """LLaRA (Liao et al. 2024): LLaRA's hybrid prompts (`title [HistoryEmb]`), projector +
    LoRA, NIP only, one stage with the curriculum from text-only to hybrid prompts spread over
    the whole stage (its code restarts it every epoch; we do not), and LLaRA's optimiser and
    5 epochs."""
    config.stage1.item_format = "llara"
    config.stage1.curriculum_from = "text"
    config.stage1.epochs = LLARA_EPOCHS
    config.stage2.item_format = "llara"
    config.train.gamma = 0.0
    config.train.beta = 0.0
    _llara_optimiser(config)
    _set_jobs(config, ["stage1"])


def rsllm_llara_optim(config):
    """RSLLM trained with LLaRA's optimiser settings (batch, learning rate, 5 % warm-up then
    cosine) instead of the paper's; the stages and their epochs are RSLLM's."""
    rsllm(config)
    _llara_optimiser(config)


# --- ablations (paper Table 4, names as there) ----------------------------------------------------


def wo_text(config):
    """"w/o Textual Feature (Titles, etc.) Representation", first reading: stage 2 writes each
    item as its behavioural token alone, no title; stage 1 keeps its text-ID prompts (the
    paper does not say what stage 1 used)."""
    rsllm(config)
    config.stage2.item_format = "behavior"


def wo_text_both_stages(config):
    """"w/o Textual Feature", second reading ("we directly fine-tune the model on behavioral
    data without using textual features", §5.3): no titles in either stage; stage 1 writes
    `[DSR][IID<n>]`, stage 2 the behavioural token. The answer is still the title."""
    wo_text(config)
    config.stage1.item_format = "iid"


def wo_item_id(config):
    """"w/o Item ID (IID/Embedding) Representation": titles only in both stages."""
    rsllm(config)
    config.stage1.item_format = "text"
    config.stage2.item_format = "text"
    _set_jobs(config, ["stage1", "stage2"], rec=False)


def wo_iid_tokens(config):
    """"w/o IID Tokens", first reading: stage 1 writes the item ID as digits (the "numerical
    index" of §5.4) instead of one [IID<n>] token per item."""
    rsllm(config)
    config.prompts.iid_tokens = False


def wo_iid_tokens_text_stage1(config):
    """"w/o IID Tokens", second reading: no ID of any kind in stage 1, whose prompts are then
    titles alone; stage 2 unchanged (hybrid)."""
    rsllm(config)
    config.stage1.item_format = "text"


def wo_preload(config):
    """"w/o Pre-loading item Embeddings": the [IID<n>] token rows start random instead of from
    the projected recommender embeddings."""
    rsllm(config)
    config.prompts.preload_iid_embeddings = False


def ui_only(config):
    """"RSLLM (U-I Only)": user-tower to target-tower alignment L_U only (γ = 0 in Eq. 5)."""
    rsllm(config)
    config.train.gamma = 0.0


def ii_only(config):
    """"RSLLM (I-I Only)": target-tower to user-tower alignment L_I only (β = 0 in Eq. 5)."""
    rsllm(config)
    config.train.beta = 0.0


def wo_contrastive(config):
    """"RSLLM (w/o. Contrastive Alignment)": NIP only (γ = β = 0 in Eq. 5), both stages."""
    rsllm(config)
    config.train.gamma = 0.0
    config.train.beta = 0.0


def stage1_only(config):
    """"Stage1 only": the text-ID stage alone."""
    rsllm(config)
    _set_jobs(config, ["stage1"])


def stage2_only(config):
    """"Stage2 only": the hybrid stage alone, from a fresh LoRA and projector."""
    rsllm(config)
    config.stage2.init_from_stage1 = False
    _set_jobs(config, ["stage2"])


PRESETS = {
    f.__name__: f
    for f in (rsllm, zero_shot, tallrec, llara, tallrec_rsllm_optim, rsllm_llara_optim, wo_text,
              wo_text_both_stages, wo_item_id, wo_iid_tokens, wo_iid_tokens_text_stage1, wo_preload,
              ui_only, ii_only, wo_contrastive, stage1_only, stage2_only)
}


def apply_preset(config, name=DEFAULT):
    """Applies preset `name` to a dataset config (config.data.name set) and returns it."""
    name = (name or DEFAULT).strip()
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    PRESETS[name](config)
    if name != DEFAULT:
        config.workdir = f"{config.workdir}-{name}"
    return config
