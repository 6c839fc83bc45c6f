"""Compile the stage-2 train step for a target topology without allocating any parameters.

  python -m rsllm_jax.compile_check --config configs/lastfm.py --topology fsdp8 \\
      [--model llama2_7b] [--batch 32] [--length 512] [--remat full]

Every argument is abstract (ShapeDtypeStructs carrying their shardings), so a 7B step compiles
on a laptop: the topology's devices are simulated CPU devices (`--topology` is a mesh preset of
rsllm_jax/parallel/layouts.py, or `N:data,fsdp,tensor` for N devices), or, with libtpu
installed (`pip install libtpu`), a TPU slice compiled by the TPU compiler without a TPU:
`--topology tpu:v5p:2x4x4 --mesh pod32` (32 v5p chips; `--mesh` a preset or data,fsdp,tensor,
default 1,-1,1). Prints per-device
memory from `compiled.memory_analysis()` (arguments, outputs, temporaries, peak estimate), the
step's FLOPs from `compiled.cost_analysis()` next to the analytic count of
rsllm_jax/training/flops.py. CPU-backend figures estimate a GPU/TPU compilation: layouts,
fusion and bf16 handling differ per backend.
"""

import argparse
import importlib.util
import os
import sys

from rsllm_jax.parallel import layouts


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="config file, e.g. configs/lastfm.py")
    parser.add_argument("--topology", default="single",
                        help=f"mesh preset ({', '.join(layouts.PRESETS)}) or N:data,fsdp,tensor")
    parser.add_argument("--mesh", default="1,-1,1",
                        help="tpu: topologies only: mesh preset or data,fsdp,tensor")
    parser.add_argument("--model", default="", help="Llama preset (default: config.model.name)")
    parser.add_argument("--batch", type=int, default=0, help="global batch (config.train)")
    parser.add_argument("--accumulation", type=int, default=0,
                        help="micro-batches per update (config.train.accumulation_steps)")
    parser.add_argument("--length", type=int, default=512, help="prompt length bucket")
    parser.add_argument("--answer", type=int, default=32, help="answer bucket (logit positions)")
    parser.add_argument("--target", type=int, default=32, help="target-tower length bucket")
    parser.add_argument("--num_new_tokens", type=int, default=4610,
                        help="added vocabulary rows (LastFM: an [IID] token per item + a few)")
    parser.add_argument("--remat", default="", help="none | full | dots | dots_no_batch")
    parser.add_argument("--scan_layers", default="", help="true | false (config.model)")
    parser.add_argument("--param_dtype", default="",
                        help="storage dtype of the frozen base, e.g. bfloat16 (config.model)")
    return parser.parse_args(argv)


def topology(name):
    """(device count, mesh shape) of a preset or of `N:data,fsdp,tensor`; (0, None) for tpu:."""
    if name.startswith("tpu:"):
        return 0, None
    if name in layouts.PRESETS:
        shape = layouts.PRESETS[name]
        return int(abs(shape[0] * shape[1] * shape[2])), shape
    count, _, shape = name.partition(":")
    if not count.isdigit() or not shape:
        raise SystemExit(f"--topology {name!r}: a preset ({', '.join(layouts.PRESETS)}) or "
                         "N:data,fsdp,tensor")
    return int(count), layouts.parse_shape(shape)


def _load_config(path):
    spec = importlib.util.spec_from_file_location("compile_check_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _gib(n):
    return f"{n / 2**30:8.3f} GiB"


def run(args):
    """Lowers and compiles; returns a dict of the figures it prints."""
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top

    from rsllm_jax.models import base, llama, rsllm  # pylint: disable=g-import-not-at-top
    from rsllm_jax.prompts import batching  # pylint: disable=g-import-not-at-top
    from rsllm_jax.training import flops, trainer  # pylint: disable=g-import-not-at-top

    config = _load_config(args.config)
    count, shape = topology(args.topology)
    if shape is None:
        from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

        devices = topologies.get_topology_desc(platform="tpu",
                                               topology_name=args.topology[4:]).devices
        count = len(devices)
        mesh_config = dict(preset=args.mesh) if args.mesh in layouts.PRESETS else dict(
            shape=args.mesh)
    else:
        devices = jax.devices()
        if len(devices) != count:
            raise SystemExit(f"{len(devices)} devices, the topology needs {count}")
        mesh_config = dict(shape=",".join(map(str, shape)))
    mesh, rules = layouts.mesh_from_config(dict(mesh_config, rules=config.mesh.rules), devices)
    m, c = config.model, config.train
    name = args.model or m.name
    scan = m.scan_layers if not args.scan_layers else args.scan_layers.lower() == "true"
    llama_config = llama.get_config(
        name,
        **base.llama_overrides(m, param_dtype=args.param_dtype or m.param_dtype, scan_layers=scan,
                               remat_policy=args.remat or m.remat_policy))
    batch_size = args.batch or c.batch_size
    layouts.validate_model(mesh, rules, llama_config, batch_size)
    model = rsllm.RSLLM(llama_config, num_new_tokens=args.num_new_tokens,
                        deterministic=m.lora_dropout == 0)
    # collate() of no prompts gives the real batch layout (keys, dtypes) at the chosen buckets.
    slots = 30
    layout_batch = batching.collate([], batch_size, 0, slots, (args.length, ), (args.answer, ),
                                    (args.target, ))
    table = jax.ShapeDtypeStruct((4607, config.rec.hidden_size), np.float32)
    # The stage's own program (trainer.make_program), built from shapes alone.
    program = trainer.make_program(model, c, 1000, mesh, rules, config.seed, layout_batch, table)
    layout, with_towers = program.layout, program.with_towers
    # One update: `accumulation` micro-batches of `batch_size` rows (train_step.py).
    accumulation = args.accumulation or c.accumulation_steps
    batch = {
        k: jax.ShapeDtypeStruct((accumulation, ) + v.shape, jax.dtypes.canonicalize_dtype(v.dtype),
                                sharding=layout.micro_batches)
        for k, v in layout_batch.items()
    }
    table = jax.ShapeDtypeStruct(table.shape, table.dtype, sharding=layout.replicated)
    compiled = program.step_fn.lower(layout.abstract_state, layout.abstract_frozen, batch,
                                     table).compile()

    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # Every position real: the analytic count of a full batch at these buckets.
    analytic = accumulation * flops.step_flops(
        llama_config, np.full(batch_size, args.length), batch_size * args.answer,
        np.full(batch_size, args.target) if with_towers else
        (), batch_size * slots, config.rec.hidden_size)
    out = dict(devices=count, mesh=dict(mesh.shape), model=name, batch=batch_size,
               accumulation=accumulation, length=args.length, remat=llama_config.remat_policy,
               scan_layers=scan, analytic_flops=analytic,
               compiled_flops=None if cost is None else cost.get("flops"))
    print(f"compile_check: {name} stage 2, {accumulation} micro-batch(es) of {batch_size} × "
          f"{args.length} (answer "
          f"{args.answer}, target {args.target}), {llama_config.dtype} compute, remat "
          f"{llama_config.remat_policy}, scan_layers {scan}")
    print(f"  topology {args.topology}: {count} {devices[0].device_kind} devices, mesh "
          f"{dict(mesh.shape)}, rules {rules}")
    if memory is not None:
        fields = dict(arguments=memory.argument_size_in_bytes, outputs=memory.output_size_in_bytes,
                      aliased=memory.alias_size_in_bytes, temporaries=memory.temp_size_in_bytes,
                      generated_code=memory.generated_code_size_in_bytes)
        fields["peak_estimate"] = (fields["arguments"] + fields["outputs"] - fields["aliased"] +
                                   fields["temporaries"])
        for key, value in fields.items():
            print(f"  memory per device, {key:15s}{_gib(value)}")
        out["memory"] = fields
    else:
        print("  memory analysis: not available on this backend")
    compiled_flops = out["compiled_flops"]
    print(f"  FLOPs per step, analytic (model FLOPs, all positions real): {analytic:.4g}")
    if compiled_flops is not None:
        # XLA counts per device program; the SPMD program runs on every device.
        print(f"  FLOPs per step, XLA cost analysis (per device × {count}):   "
              f"{compiled_flops * count:.4g} (ratio {compiled_flops * count / analytic:.2f})")
        if scan:
            print("  (XLA's cost analysis counts a loop body once: with scan_layers the decoder "
                  f"layers count once, not {llama_config.num_layers} times)")
        if accumulation > 1:
            print("  (and the micro-batch loops once: one micro-batch's forward of pass 1 and "
                  "forward and backward of pass 2, against the analytic count of "
                  f"{accumulation} micro-batches' forward and backward)")
    return out


def main(argv=None):
    args = _parse(sys.argv[1:] if argv is None else argv)
    count, _ = topology(args.topology)
    # The simulated device count must be set before JAX initialises its backends (importing
    # jax does not; run() checks the count it got).
    if count:
        flags = os.environ.get("XLA_FLAGS", "")
        flags = " ".join(f for f in flags.split()
                         if not f.startswith("--xla_force_host_platform_device_count"))
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"  # A TPU topology compiles without a TPU backend.
    run(args)


if __name__ == "__main__":
    from rsllm_jax import cli  # pylint: disable=g-import-not-at-top

    with cli.one_line_errors():
        main()
