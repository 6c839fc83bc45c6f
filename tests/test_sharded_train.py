"""The stage train step sharded over 8 simulated CPU devices equals the unsharded step.

Each 8-device mesh preset runs one stage-2 step (tiny Llama, RSLLM with behavioural tokens,
both towers, Adam with clipping) and must give the unsharded loss and updated trainable
parameters; impossible layouts must fail with clear errors before compiling. The device count
is fixed before JAX starts, so the checks run in a subprocess (this file as a script).
"""

import os
import subprocess
import sys

PRESETS = ("data8", "fsdp8", "data2_tensor4")


def test_sharded_step_equals_unsharded_and_bad_layouts_fail():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                            timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)) or ".")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for preset in PRESETS:
        assert f"preset {preset} ok" in result.stdout
    assert "restore ok" in result.stdout
    assert "accumulation ok" in result.stdout
    assert "errors ok" in result.stdout


def test_distributed_start_up_is_a_no_op_for_one_process():
    from rsllm_jax import main  # pylint: disable=g-import-not-at-top

    assert not main.initialize_distributed({})
    assert not main.initialize_distributed(
        dict(JAX_COORDINATOR_ADDRESS="localhost:1234", JAX_NUM_PROCESSES="1", JAX_PROCESS_ID="0"))


def _check():
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    import ml_collections  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top

    from rsllm_jax.models import llama, lora as lora_lib, rsllm  # pylint: disable=g-import-not-at-top
    from rsllm_jax.parallel import layouts  # pylint: disable=g-import-not-at-top
    from rsllm_jax.training import sharding, train_step  # pylint: disable=g-import-not-at-top
    from stage_batches import stage_batch  # pylint: disable=g-import-not-at-top

    assert jax.device_count() == 8
    vocab, num_new, rows = 256, 3, 16
    config = llama.get_config("tiny", vocab_size=vocab, hidden_size=64, intermediate_size=128,
                              num_layers=1, num_heads=8, num_kv_heads=4, tie_word_embeddings=False,
                              initializer_range=0.2, lora=lora_lib.LoraConfig(rank=4, alpha=8.0))
    model = rsllm.RSLLM(config, num_new_tokens=num_new)
    train = ml_collections.ConfigDict(
        dict(gamma=0.3, beta=0.4, temperature=0.5, symmetric_infonce=False))
    # The stages' optimiser without its warm-up (whose first learning rate is 0). A large eps
    # keeps Adam's first update (lr·g/(|g|+eps)) from turning near-zero gradients into ±lr.
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(1e-2, eps=1e-3, weight_decay=1e-3))
    step = train_step.make_train_step(model, optimizer, train, with_target_tower=True)
    batch = stage_batch(np.random.default_rng(0), rows, 24, vocab, vocab, num_new, 6)
    one = {k: v[None] for k, v in batch.items()}  # One micro-batch per update.
    table = np.random.default_rng(1).normal(size=(21, 16)).astype(np.float32)

    # Random values from NumPy on the abstract variables: compiling the init costs more here.
    rng = np.random.default_rng(2)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, x: (1.0 if "scale" in jax.tree_util.keystr(path) else 0.0) + 0.2 * rng.
        standard_normal(x.shape).astype(np.float32),
        nn.unbox(jax.eval_shape(model.init, jax.random.key(0), batch, table)))
    frozen, trainable = rsllm.split_variables(variables)
    host = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731
    state = train_step.create_state(trainable, optimizer, 0)
    ref_state, ref_metrics = jax.jit(step)(state, frozen, one, table)
    ref_trainable = host(ref_state.trainable)
    moved = max(
        np.abs(a - b).max()
        for a, b in zip(jax.tree.leaves(ref_trainable), jax.tree.leaves(trainable)))
    assert moved > 1e-3, moved  # The step really updates the parameters.

    for preset in ("data8", "fsdp8", "data2_tensor4"):
        mesh, rules = layouts.mesh_from_config(dict(preset=preset))
        layout = sharding.make_layout(mesh, rules, model, optimizer, 0, batch, table)
        sharded_step = sharding.jit_train_step(step, layout)
        params = layout.put_frozen(frozen)
        state = sharding.create_state(jax.device_put(trainable, layout.state.trainable), optimizer,
                                      0, layout)
        # The frozen base is placed in shards: q_proj (embed, heads, head_dim) = (64, 8, 8).
        q = params["params"]["llm"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
        expected = {"data8": (64, 8, 8), "fsdp8": (8, 8, 8), "data2_tensor4": (64, 2, 8)}
        assert q.sharding.shard_shape(q.shape) == expected[preset], (preset, q.sharding)
        new_state, metrics = sharded_step(state, params, one, layout.put_replicated(table))
        for key in ("total", "nip", "grad_norm", "lora_norm", "projector_norm"):
            np.testing.assert_allclose(float(metrics[key]), float(ref_metrics[key]), rtol=2e-5,
                                       err_msg=f"{preset} {key}")
        for path, got in jax.tree_util.tree_flatten_with_path(new_state.trainable)[0]:
            want = ref_trainable
            for key in path:
                want = want[key.key]
            assert got.sharding == _get(layout.state.trainable, path), path
            np.testing.assert_allclose(np.asarray(got), want, atol=2e-5,
                                       err_msg=f"{preset} {jax.tree_util.keystr(path)}")
        # The optimiser state too (Adam's moments hold the gradients), on its shardings.
        for got, want, sh in zip(jax.tree.leaves(new_state.opt_state),
                                 jax.tree.leaves(ref_state.opt_state),
                                 jax.tree.leaves(layout.state.opt_state)):
            assert got.sharding == sh
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-7)
        print(f"preset {preset} ok", flush=True)

    # Two micro-batches of 8 rows (gradient caching, each micro-batch split over the 8
    # devices) give the update of the 16 rows as one batch.
    acc_mesh, acc_rules = layouts.mesh_from_config(dict(preset="fsdp8"))
    acc_layout = sharding.make_layout(acc_mesh, acc_rules, model, optimizer, 0, batch, table)
    acc_start = sharding.create_state(jax.device_put(trainable, acc_layout.state.trainable),
                                      optimizer, 0, acc_layout)
    accumulated = {k: v.reshape((2, rows // 2) + v.shape[1:]) for k, v in batch.items()}
    acc_state, acc_metrics = sharding.jit_train_step(step,
                                                     acc_layout)(acc_start,
                                                                 acc_layout.put_frozen(frozen),
                                                                 accumulated,
                                                                 acc_layout.put_replicated(table))
    for key in ("total", "nip", "item_item", "user_item", "grad_norm"):
        np.testing.assert_allclose(float(acc_metrics[key]), float(ref_metrics[key]), rtol=1e-4,
                                   err_msg=f"accumulated {key}")
    for got, want in zip(jax.tree.leaves(acc_state.trainable), jax.tree.leaves(ref_trainable)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=2e-5)
    print("accumulation ok", flush=True)

    # Orbax restores the state onto the same shardings.
    import tempfile  # pylint: disable=g-import-not-at-top

    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state")
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(path, new_state)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(path, layout.abstract_state)
    for got, want, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(new_state),
                             jax.tree.leaves(layout.state)):
        assert got.sharding == sh
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    print("restore ok", flush=True)

    def raises(fn, *needles):
        try:
            fn()
        except ValueError as e:
            assert all(n in str(e) for n in needles), str(e)
            return
        raise AssertionError(f"no error for {needles}")

    # Batch 12 is not divisible by data×fsdp = 8.
    mesh, rules = layouts.mesh_from_config(dict(preset="fsdp8"))
    raises(lambda: layouts.validate_model(mesh, rules, config, 12), "batch size 12",
           "divisible by the 8 devices")
    layout = sharding.make_layout(mesh, rules, model, optimizer, 0, batch, table)
    raises(lambda: layout.put_batch({k: v[:12] for k, v in batch.items()}), "12 rows")
    # A 4-way tensor axis cannot split 2 KV heads.
    mesh, rules = layouts.mesh_from_config(dict(preset="data2_tensor4"))
    gqa = model.clone(config=config.replace(num_kv_heads=2))
    raises(lambda: sharding.make_layout(mesh, rules, gqa, optimizer, 0, batch, table),
           "num_kv_heads = 2", "4-way tensor axis")
    raises(
        lambda: layouts.validate_model(mesh, rules,
                                       config.replace(num_heads=6, num_kv_heads=3, head_dim=8)),
        "num_heads = 6")
    # Mesh size ≠ device count, with the preset named.
    raises(lambda: layouts.mesh_from_config(dict(preset="pod32")), "needs 32 devices",
           "8 are available", "pod32")
    raises(lambda: layouts.mesh_from_config(dict(shape="3,-1,1")), "not a multiple of 3")
    raises(lambda: layouts.mesh_from_config(dict(shape="2,2,1")), "needs 4 devices")
    # A vocabulary the tensor axis cannot split names the parameter.
    odd = model.clone(config=config.replace(vocab_size=250))
    raises(lambda: sharding.make_layout(mesh, rules, odd, optimizer, 0, batch, table),
           "embed_tokens", "(250)", "4 ways")
    print("errors ok", flush=True)


def _get(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


if __name__ == "__main__":
    _check()
