"""The persistent compilation cache: where it lives, how it is turned off, and that a second
process loads what the first compiled instead of compiling it again."""

import json
import os
import subprocess
import sys

from rsllm_jax import compilation_cache

# A process that enables the cache the way every command does, compiles one function and
# prints how many compilations JAX served from the cache.
CHILD = """
import json, jax, jax.numpy as jnp
from rsllm_jax import compilation_cache
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
folder = compilation_cache.enable()
def f(x):
    for i in range(8):
        x = jnp.tanh(x @ x.T) + i
    return x
value = float(jax.jit(f)(jnp.eye(16)).sum())
print(json.dumps(dict(folder=folder, hits=len(hits), value=value)))
"""


def _child(env):
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, check=True, text=True,
                         capture_output=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_default_folder_is_per_machine_under_the_user_cache(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    folder = compilation_cache.cache_dir(env)
    assert folder == os.path.join(str(tmp_path), "rsllm_jax", "jax",
                                  compilation_cache.machine_key())
    assert len(compilation_cache.machine_key()) == 16
    assert compilation_cache.cache_dir({compilation_cache.ENV: "off"}) is None
    assert compilation_cache.cache_dir({compilation_cache.ENV: str(tmp_path / "c")}) == \
        str(tmp_path / "c")
    assert compilation_cache.cache_dir({"JAX_COMPILATION_CACHE_DIR": "/x"}) == "/x"


def test_a_second_process_loads_the_compiled_program(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp_path),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop(compilation_cache.ENV, None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    first = _child(env)
    assert first["folder"].startswith(str(tmp_path)) and first["hits"] == 0
    assert os.listdir(first["folder"])  # The compiled programs were written.
    second = _child(env)
    assert second["hits"] > 0 and second["value"] == first["value"]
    off = _child(dict(env, **{compilation_cache.ENV: "off"}))
    assert off["folder"] is None and off["hits"] == 0
