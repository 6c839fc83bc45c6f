"""JAX's persistent compilation cache, on by default for every command.

A step compiles its train step, its evaluation and its decoding for every length bucket; on a
CPU that is minutes of a short run. With the cache, a second run of any step (a resumed run, the
next seed, another row of an experiment) loads the compiled programs instead.

Where: `RSLLM_COMPILATION_CACHE` if set (`off` disables it), else JAX's own
`JAX_COMPILATION_CACHE_DIR` if set, else `<user cache dir>/rsllm_jax/jax/<machine>`, the user
cache dir being `$XDG_CACHE_HOME` or `~/.cache`. `<machine>` is a digest of the CPU (model and
instruction-set flags) and the jaxlib version: XLA compiles CPU programs for the CPU it runs on,
so a home folder shared by different machines keeps one cache per machine. JAX writes only
programs that took at least `jax_persistent_cache_min_compile_time_secs` (1 s) to compile.
"""

import hashlib
import os
import platform

ENV = "RSLLM_COMPILATION_CACHE"
OFF = ("off", "0", "false", "none")


def machine_key():
    """A short digest of this CPU's model and instruction-set flags and of the jaxlib version."""
    import jaxlib  # pylint: disable=g-import-not-at-top

    cpu = [platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = f.read().splitlines()
        cpu += sorted({
            line
            for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")
        })
    except OSError:  # Not Linux: the processor string is what there is.
        cpu.append(platform.processor())
    text = "\n".join(cpu + [f"jaxlib {jaxlib.__version__}"])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_dir(env=None):
    """`<user cache dir>/rsllm_jax/jax/<machine key>`."""
    env = os.environ if env is None else env
    root = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "rsllm_jax", "jax", machine_key())


def cache_dir(env=None):
    """The folder the cache uses under `env` (default: os.environ), or None when it is off."""
    env = os.environ if env is None else env
    chosen = env.get(ENV, "").strip()
    if chosen.lower() in OFF:
        return None
    return chosen or env.get("JAX_COMPILATION_CACHE_DIR") or default_dir(env)


def enable(env=None):
    """Points JAX's persistent compilation cache at `cache_dir(env)`; call before compiling.
    Returns the folder, or None when the cache is off."""
    import jax  # pylint: disable=g-import-not-at-top

    folder = cache_dir(env)
    if folder is not None:
        jax.config.update("jax_compilation_cache_dir", folder)
    return folder
