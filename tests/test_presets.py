"""Experiment presets (configs/presets.py), LLaRA's text→hybrid curriculum and pre-loaded IID
token rows (rsllm_jax/prompts/stages.py, rsllm_jax/models/rsllm.py)."""

import os

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from ml_collections import config_flags

from configs import base, demo, lastfm, miniature, movielens, presets, shared_titles, steam
from rsllm_jax import main, run_paths
from rsllm_jax.run_paths import data_dir
from rsllm_jax.data.storage import PreparedDataset
from rsllm_jax.models import llama, rsllm
from rsllm_jax.prompts import stages, templates
from rsllm_jax.recommenders import embeddings, save_item_embeddings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = {
    "lastfm": lastfm, "movielens": movielens, "steam": steam, "demo": demo, "miniature": miniature,
    "shared_titles": shared_titles
}
HAS_EVAL = "eval" in main.STEPS


def _jobs(config):
    return main.parse_jobs(config.jobs)


# --- presets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize("preset", sorted(presets.PRESETS))
def test_every_preset_builds_a_runnable_config(dataset, preset):
    config = DATASETS[dataset].get_config(preset)
    jobs = _jobs(config)  # Only known steps.
    assert jobs[0] == "prepare"
    assert ("eval" in jobs) == HAS_EVAL
    for stage in run_paths.STAGES:
        assert config[stage].item_format in templates.ITEM_FORMATS
        assert config[stage].curriculum_from in ("", ) + templates.ITEM_FORMATS
    # Every stage that reads the recommender's table runs after the rec step.
    for stage in set(jobs) & set(run_paths.STAGES):
        uses_table = set(stages.stage_formats(config, stage)) & set(templates.PLACEHOLDER_FORMATS)
        if uses_table or stages.preloads_iid_rows(config, stage):
            assert jobs.index("rec") < jobs.index(stage)
    # The recommender stays an orthogonal choice.
    assert config.rec.to_dict() == DATASETS[dataset].get_config().rec.to_dict()


def test_default_is_rsllm_and_other_presets_get_their_own_workdir():
    assert lastfm.get_config().to_dict() == lastfm.get_config("rsllm").to_dict()
    workdirs = {lastfm.get_config(name).workdir for name in presets.PRESETS}
    assert len(workdirs) == len(presets.PRESETS)
    assert lastfm.get_config("tallrec").workdir == "runs/lastfm-tallrec"


def test_rsllm_is_the_paper_method():
    config = lastfm.get_config("rsllm")
    defaults = base.get_config()
    assert _jobs(config)[:4] == ["prepare", "rec", "stage1", "stage2"]
    assert (config.stage1.item_format, config.stage2.item_format) == ("text_id", "hybrid")
    assert config.stage1.curriculum_from == config.stage2.curriculum_from == ""
    assert (config.train.gamma, config.train.beta) == (0.3, 0.4)
    assert config.train.learning_rate == defaults.train.learning_rate == 1e-5
    assert config.prompts.iid_tokens and config.prompts.preload_iid_embeddings
    assert config.stage2.init_from_stage1


def test_zero_shot_trains_nothing():
    config = steam.get_config("zero_shot")
    assert not set(_jobs(config)) & {"rec", "stage1", "stage2"}
    assert config.stage1.item_format == config.stage2.item_format == "text"
    if HAS_EVAL:
        assert config.eval.stage == "base"


@pytest.mark.parametrize("dataset,batch,accumulation,lr", [("lastfm", 8, 16, 7e-4),
                                                           ("movielens", 8, 16, 8e-4),
                                                           ("steam", 4, 32, 5e-4)])
def test_tallrec_is_one_text_stage_with_nip_only_and_llaras_recipe(dataset, batch, accumulation,
                                                                   lr):
    config = DATASETS[dataset].get_config("tallrec")
    assert _jobs(config)[:2] == ["prepare", "stage1"] and "stage2" not in _jobs(config)
    assert config.stage1.item_format == "text"
    assert config.train.gamma == config.train.beta == 0.0
    t = config.train
    assert (t.batch_size, t.accumulation_steps, t.learning_rate) == (batch, accumulation, lr)
    assert (t.warmup_ratio, t.decay, config.stage1.epochs) == (0.05, "cosine", 5)
    # The earlier recipe stays as a named variant: RSLLM's optimiser, 3 epochs.
    other = DATASETS[dataset].get_config("tallrec_rsllm_optim")
    reference = DATASETS[dataset].get_config()
    assert other.train.to_dict() == dict(reference.train.to_dict(), gamma=0.0, beta=0.0)
    assert other.stage1.epochs == 3 and other.stage1.item_format == "text"


@pytest.mark.parametrize("dataset,batch,accumulation,lr", [("lastfm", 8, 16, 7e-4),
                                                           ("movielens", 8, 16, 8e-4),
                                                           ("steam", 4, 32, 5e-4)])
def test_llara_uses_its_format_curriculum_and_per_dataset_optimiser(dataset, batch, accumulation,
                                                                    lr):
    config = DATASETS[dataset].get_config("llara")
    jobs = _jobs(config)
    assert jobs[:3] == ["prepare", "rec", "stage1"] and "stage2" not in jobs
    assert config.stage1.item_format == "llara" and config.stage1.curriculum_from == "text"
    assert config.stage1.epochs == 5
    assert config.train.gamma == config.train.beta == 0.0
    t = config.train
    assert (t.batch_size, t.accumulation_steps, t.learning_rate) == (batch, accumulation, lr)
    assert (t.warmup_ratio, t.decay) == (0.05, "cosine")
    # RSLLM under the same optimiser differs only in the method.
    other = DATASETS[dataset].get_config("rsllm_llara_optim")
    assert (other.train.batch_size, other.train.accumulation_steps, other.train.learning_rate,
            other.train.warmup_ratio) == (batch, accumulation, lr, 0.05)
    assert (other.stage1.item_format, other.stage2.item_format) == ("text_id", "hybrid")
    assert (other.train.gamma, other.train.beta) == (0.3, 0.4)
    assert _jobs(other)[:4] == ["prepare", "rec", "stage1", "stage2"]


def test_llara_on_the_demo_keeps_the_demo_batch():
    config = demo.get_config("llara")
    reference = demo.get_config()
    assert config.train.batch_size == reference.train.batch_size
    assert config.train.learning_rate == reference.train.learning_rate
    assert config.train.warmup_ratio == 0.05


def test_ablations_change_one_thing():
    reference = lastfm.get_config().to_dict()

    def changes(name):
        config = lastfm.get_config(name).to_dict()
        diff = {}
        for section, values in config.items():
            if isinstance(values, dict):
                diff.update(
                    {f"{section}.{k}": v
                     for k, v in values.items() if reference[section][k] != v})
            elif reference[section] != values and section not in ("workdir", "jobs"):
                diff[section] = values
        return diff

    assert changes("wo_text") == {"stage2.item_format": "behavior"}
    assert changes("wo_text_both_stages") == {
        "stage1.item_format": "iid", "stage2.item_format": "behavior"
    }
    assert changes("wo_iid_tokens_text_stage1") == {"stage1.item_format": "text"}
    assert changes("wo_item_id") == {"stage1.item_format": "text", "stage2.item_format": "text"}
    assert "rec" not in _jobs(lastfm.get_config("wo_item_id"))
    assert changes("wo_iid_tokens") == {"prompts.iid_tokens": False}
    assert changes("wo_preload") == {"prompts.preload_iid_embeddings": False}
    assert changes("ui_only") == {"train.gamma": 0.0}
    assert changes("ii_only") == {"train.beta": 0.0}
    assert changes("wo_contrastive") == {"train.gamma": 0.0, "train.beta": 0.0}
    assert changes("stage1_only") == {}
    assert "stage2" not in _jobs(lastfm.get_config("stage1_only"))
    assert changes("stage2_only") == {"stage2.init_from_stage1": False}
    jobs = _jobs(lastfm.get_config("stage2_only"))
    assert "stage1" not in jobs and jobs[:3] == ["prepare", "rec", "stage2"]


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(
            ValueError, match=r"unknown preset 'tallrek'; known presets: rsllm, "
            r"zero_shot, tallrec, llara"):
        lastfm.get_config("tallrek")


def test_command_line_selects_a_preset_and_overrides_the_recommender():
    argv = [
        "prog", f"--config={REPO}/configs/lastfm.py:llara", "--config.rec.model=gru4rec",
        "--config.stage1.max_steps=4"
    ]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    config = flag_values.config
    assert config.rec.model == "gru4rec"
    assert config.stage1.item_format == "llara" and config.stage1.max_steps == 4
    assert config.train.learning_rate == 7e-4


# --- the curriculum ------------------------------------------------------------------------------


def test_curriculum_goes_from_the_start_format_to_the_stage_format():
    rows = np.arange(500)
    total = 11
    assert not stages.curriculum_choices(0, 0, rows, total).any()
    assert stages.curriculum_choices(0, total - 1, rows, total).all()
    probabilities = [stages.curriculum_probability(s, total) for s in range(total)]
    np.testing.assert_allclose(probabilities, np.linspace(0, 1, total))
    # The share of stage-format examples follows p(step) (500 draws: std < 0.023).
    shares = [stages.curriculum_choices(0, s, rows, total).mean() for s in range(total)]
    np.testing.assert_allclose(shares, probabilities, atol=0.08)
    assert np.corrcoef(shares, probabilities)[0, 1] > 0.98
    assert stages.curriculum_probability(0, 1) == 1.0  # A one-step stage is the stage format.


def test_curriculum_choices_are_deterministic_per_seed_step_and_row():
    rows = np.arange(200)
    first = stages.curriculum_choices(3, 5, rows, 11)
    np.testing.assert_array_equal(first, stages.curriculum_choices(3, 5, rows, 11))
    # Row by row, in any batch composition, as after a resume on another process count.
    np.testing.assert_array_equal(first[::-1], stages.curriculum_choices(3, 5, rows[::-1], 11))
    assert 0 < first.sum() < len(rows)  # Different rows draw differently.
    assert (first != stages.curriculum_choices(4, 5, rows, 11)).any()  # Seed.
    assert (first != stages.curriculum_choices(3, 6, rows, 10)).any()  # Step, same p.


def test_item_formats_add_the_curriculum_tokens_after_the_stage_ones():
    config = demo.get_config("llara")
    assert stages.item_formats(config) == ["llara", "llara", "text"]
    config = demo.get_config()
    config.stage2.curriculum_from = "text_id"
    assert stages.item_formats(config) == ["text_id", "hybrid", "text_id"]
    assert stages.stage_formats(config, "stage2") == ["hybrid", "text_id"]


# --- pre-loaded IID rows -------------------------------------------------------------------------


def _fresh_trainable(num_new, hidden):
    """What RSLLM.init gives the preload: a random projector and new-token rows (and LoRA)."""
    projector = nn.unbox(rsllm.Projector(hidden).init(jax.random.PRNGKey(0), jnp.zeros(
        (1, 64))))[rsllm.ADAPTER]
    rows = 0.02 * jax.random.normal(jax.random.PRNGKey(1), (num_new, hidden))
    return {
        "lora": {"a": jnp.ones((2, 2))}, rsllm.ADAPTER: dict(projector=projector,
                                                             new_token_embedding=rows)
    }


def test_preload_sets_iid_rows_to_the_rescaled_projection():
    num_items = 7
    config = llama.get_config("tiny", hidden_size=32)
    trainable = _fresh_trainable(num_items + 1, 32)  # [DSR] then one row per item.
    table = np.random.default_rng(0).normal(size=(num_items + 1, 64)).astype(np.float32)
    embed = np.random.default_rng(1).normal(0, 0.02, size=(64, 32)).astype(np.float32)
    iid_rows = list(range(1, num_items + 1))
    out = rsllm.preload_iid_embeddings(trainable, table, iid_rows, embed, config)
    projected = np.asarray(
        rsllm.Projector(32).apply({rsllm.ADAPTER: trainable[rsllm.ADAPTER]["projector"]},
                                  table[:num_items]))
    rows = np.asarray(out[rsllm.ADAPTER]["new_token_embedding"])
    before = np.asarray(trainable[rsllm.ADAPTER]["new_token_embedding"])
    scale = np.linalg.norm(embed, axis=-1).mean() / np.linalg.norm(projected, axis=-1).mean()
    np.testing.assert_allclose(rows[1:], projected * scale, rtol=1e-5, atol=1e-7)
    # Token-sized rows: the mean norm is the embedding table's, not the raw projection's.
    np.testing.assert_allclose(
        np.linalg.norm(rows[1:], axis=-1).mean(),
        np.linalg.norm(embed, axis=-1).mean(), rtol=1e-5)
    np.testing.assert_array_equal(rows[0], before[0])  # [DSR] keeps its row.
    assert not np.allclose(before[1:], rows[1:])  # The random init is replaced.
    # Nothing else moved.
    jax.tree.map(np.testing.assert_array_equal, out["lora"], trainable["lora"])


def test_preload_applies_only_to_fresh_text_id_stages_with_the_flag_on():
    config = demo.get_config()
    assert stages.preloads_iid_rows(config, "stage1")
    assert not stages.preloads_iid_rows(config, "stage2")  # Starts from stage 1.
    assert not stages.preloads_iid_rows(demo.get_config("wo_preload"), "stage1")
    assert not stages.preloads_iid_rows(demo.get_config("wo_iid_tokens"), "stage1")
    assert not stages.preloads_iid_rows(demo.get_config("tallrec"), "stage1")
    config.stage2.item_format = "text_id"
    config.stage2.init_from_stage1 = False
    assert stages.preloads_iid_rows(config, "stage2")


def test_preload_without_a_recommender_table(tmp_path):
    config = demo.get_config()
    # The rec step did not run (jobs without it): the rows stay random, with a warning.
    assert embeddings.preload_table(config, str(tmp_path), 5) is None
    # A table named explicitly must exist.
    config.prompts.item_embeddings = str(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match="missing.json"):
        embeddings.preload_table(config, str(tmp_path), 5)


# --- a short stage with the curriculum and pre-loading --------------------------------------------


def _small(config):
    config.data.synthetic.num_users = 80
    config.data.synthetic.num_items = 60
    config.model.demo_vocab_size = 400
    config.model.lora_dropout = 0.0
    config.pretrain.steps = 0  # The random-init base itself (tests/test_pretrain.py).
    config.train.batch_size = 8
    config.prompts.length_buckets = "512"
    return config


def test_the_base_is_pretrained_before_the_stages_only_when_configured():
    assert "pretrain" not in _jobs(lastfm.get_config())
    jobs = _jobs(demo.get_config())
    assert jobs.index("rec") < jobs.index("pretrain") < jobs.index("stage1")
    # The demo's zero-shot row evaluates its pre-trained base.
    assert _jobs(demo.get_config("zero_shot")) == ["prepare", "pretrain", "eval"]


def _iid_rows(config, num_items):
    """Row of [IID<n>] among the new tokens: add_special_tokens's order."""
    tokens = []
    for item_format in stages.item_formats(config):
        for token in templates.special_tokens(item_format, num_items, config.prompts.iid_tokens):
            if token not in tokens:
                tokens.append(token)
    return [tokens.index(templates.iid_token(n)) for n in range(num_items)]


def test_curriculum_stage_runs_and_preloads_iid_rows(tmp_path):
    config = _small(demo.get_config())
    config.jobs = "prepare"
    workdir = str(tmp_path)
    main.run_pipeline(config, workdir)
    num_items = PreparedDataset(data_dir(config, workdir)).catalogue.num_items
    table = np.random.default_rng(0).normal(size=(num_items + 1, 64)).astype(np.float32)
    config.prompts.item_embeddings = save_item_embeddings(tmp_path / "items.npy", table,
                                                          num_items=num_items, model="random",
                                                          source="test")
    # Hybrid prompts after text-ID ones: both formats' tokens, and the IID rows to pre-load.
    config.jobs = "prepare,stage1"
    config.stage1.item_format = "hybrid"
    config.stage1.curriculum_from = "text_id"
    config.stage1.max_steps = 4
    config.train.learning_rate = 0.0  # Parameters stay at their initial values.
    config.train.gamma = config.train.beta = 0.0  # NIP only, as LLaRA: a smaller compilation.
    metrics = main.run_pipeline(config, workdir)["stage1"]
    assert metrics["steps"] == 4 and metrics["curriculum_from"] == "text_id"
    assert metrics["preloaded_iid_embeddings"]
    assert np.isfinite(metrics["epochs"][-1]["train_loss"])
    assert np.isfinite(metrics["epochs"][-1]["val"]["total"])
    final = ocp.StandardCheckpointer().restore(os.path.abspath(tmp_path / "stage1" / "final"))
    adapter = final[rsllm.ADAPTER]
    projected = np.asarray(
        rsllm.Projector(adapter["projector"]["w2"].shape[0]).apply(
            {rsllm.ADAPTER: adapter["projector"]}, table[:num_items]))
    rows = np.asarray(adapter["new_token_embedding"])[_iid_rows(config, num_items)]
    # Pre-loaded rows are one common multiple of Proj(e_n), at the scale of token rows.
    scale = (rows * projected).sum() / (projected * projected).sum()
    np.testing.assert_allclose(rows, scale * projected, rtol=1e-4, atol=1e-6)
    assert 0.01 < np.linalg.norm(rows, axis=-1).mean() < 1.0  # tiny: rows of std 0.02, d 128.
