"""The run's recommender kept loadable, to score the whole catalogue for a history.

The rec step writes each seed's best parameters beside its item table
(`rec/<model>_<loss>/seed_<n>/recommender/`: `recommender.json`, the model, its sizes and where
it came from, and `params/`, orbax) and copies the chosen seed's, the one whose item table the
LLM stages use, to `<workdir>/rec/recommender/`, which `recommend` and the eval step's
full-catalogue ranking read.

Runs made before the rec step wrote that folder still load: the chosen seed's last orbax
checkpoint holds its best parameters too (`best_params`), and an imported LLaRA recommender is
imported again from `config.rec.init_from`. Whatever the source, the loaded model's item
table must equal the table the LLM was trained with, or loading fails: retrieval by one
recommender and behavioural tokens from another would be a different model.
"""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from rsllm_jax import run_paths
from rsllm_jax.recommenders import embeddings as embeddings_lib
from rsllm_jax.recommenders import models as models_lib

FORMAT = "rsllm_jax.recommender.v1"


def recommender_dir(workdir):
    return run_paths.as_path(workdir) / "rec" / "recommender"


# `models.build_model`'s keyword arguments, read back from a built model.
_SIZES = ("hidden_size", "max_len", "dropout_rate", "num_heads", "num_filters", "filter_sizes")


def save_recommender(directory, model_name, model, params, source):
    """Writes `model`'s sizes and `params` ({"params": ...}) to `directory`."""
    directory = run_paths.absolute(directory)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", params, force=True)
    checkpointer.wait_until_finished()
    sizes = {name: getattr(model, name) for name in _SIZES if hasattr(model, name)}
    meta = dict(format=FORMAT, model=model_name, num_items=model.num_items, model_kwargs=sizes,
                source=source)
    if jax.process_index() != 0:  # orbax wrote the parameters from every process.
        return directory
    (directory / "recommender.json").write_text(json.dumps(meta, indent=2))
    return directory


def _from_folder(directory):
    meta = json.loads((run_paths.as_path(directory) / "recommender.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory}/recommender.json: format {meta.get('format')!r}, "
                         f"expected {FORMAT!r}")
    model = models_lib.build_model(meta["model"], meta["num_items"], **meta["model_kwargs"])
    params = ocp.StandardCheckpointer().restore(run_paths.absolute(directory) / "params")
    return model, params, meta["source"]


def _from_seed_checkpoint(config, workdir, num_items):
    """The chosen seed's best parameters from its last rec checkpoint (runs made before the
    rec step wrote `rec/recommender`)."""
    from rsllm_jax.recommenders import train  # It imports this module.

    rec = config.rec
    seed = json.loads(run_paths.metrics_path(workdir,
                                             "rec").read_text())["metrics"]["embeddings_seed"]
    checkpoints = run_paths.absolute(
        run_paths.checkpoints_dir(
            run_paths.as_path(workdir) / "rec" / f"{rec.model}_{rec.loss}" / f"seed_{seed}"))
    manager = ocp.CheckpointManager(checkpoints)
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{checkpoints}: no checkpoint of the recommender's seed {seed}")
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    manager.close()
    model = models_lib.build_model(rec.model, num_items, **train.model_kwargs(rec))
    return model, state["best_params"], f"{checkpoints}, step {step}, best_params"


def load_recommender(config, workdir, num_items, item_table_path):
    """(model, params, source) of the run's recommender; its item table must equal the one at
    `item_table_path` (the table the LLM stages read)."""
    directory = recommender_dir(workdir)
    if (directory / "recommender.json").exists():
        model, params, source = _from_folder(directory)
    elif config.rec.init_from:
        from rsllm_jax.checkpoint import llara_rec

        model, params = llara_rec.import_llara_recommender(config.rec.init_from, num_items)
        source = os.path.abspath(config.rec.init_from)
    elif run_paths.metrics_path(workdir, "rec").exists():
        model, params, source = _from_seed_checkpoint(config, workdir, num_items)
    else:
        raise FileNotFoundError(
            f"{workdir}: no trained recommender (no {directory}, no metrics/rec.json); run the "
            "rec step, or give the candidates to rank")
    if model.num_items != num_items:
        raise ValueError(f"{source}: a recommender for {model.num_items} items, but the "
                         f"catalogue has {num_items}")
    table, _ = embeddings_lib.load_item_embeddings(item_table_path, num_items)
    own = np.asarray(models_lib.item_embedding_table(params["params"]), np.float32)
    if not np.array_equal(own[:num_items], np.asarray(table, np.float32)[:num_items]):
        raise ValueError(f"{source}: this recommender's item embeddings differ from "
                         f"{item_table_path}, the table the LLM stages were trained with; "
                         "retrieval needs the recommender behind that table")
    return model, params, source
