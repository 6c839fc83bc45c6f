"""Runs the pipeline as N processes on this machine, joined by JAX's distributed runtime: the
way to run and debug pod code (several hosts, one global mesh) on a laptop or a CI machine.

  python launch/local_cluster.py N CONFIG [--devices D] [--workdir DIR] [--config.x=y ...]

Each process gets D simulated CPU devices (default 2; N·D devices in all), the coordinator
address of process 0 on a free localhost port, its process id, and CPU collectives over gloo,
exactly the variables a pod's processes get (rsllm_jax/main.py: initialize_distributed).
Every line a process prints is prefixed with its id. SIGINT and SIGTERM are forwarded to all
processes (SIGTERM: they agree on one step, save it and exit; a rerun resumes). When one
process fails the others are stopped (SIGTERM, then SIGKILL after --grace seconds), and the
launcher exits with the first failing exit code (128 + signal number for a killed process),
0 when all succeed. Run `prepare` once first (`--config.jobs=prepare` as one process): N
processes would all write the same data folder.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port():
    """A localhost TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(process_id, num_processes, devices, port, base=None):
    """The environment of process `process_id` of a localhost cluster."""
    env = dict(os.environ if base is None else base)
    flags = [
        f for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(process_id), JAX_PLATFORMS="cpu",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]))
    # A process that dies is noticed by the others within this many seconds (rather than
    # JAX's default 100) when nothing else stops them first.
    env.setdefault("RSLLM_HEARTBEAT_TIMEOUT", "30")
    return env


def _relay(stream, prefix, out):
    for line in iter(stream.readline, b""):
        out.write(prefix + line.decode(errors="replace"))
        out.flush()
    stream.close()


def exit_code(returncode):
    """A shell-style exit code: 128 + the signal number for a process killed by a signal."""
    return 128 - returncode if returncode < 0 else returncode


def run_cluster(num_processes, command, devices=2, grace=30.0, out=sys.stdout):
    """Runs `command` (argv) as `num_processes` processes; returns the first failing exit code,
    or 0 when every process exits 0."""
    port = free_port()
    procs = [
        subprocess.Popen(command, env=process_env(i, num_processes, devices, port),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        for i in range(num_processes)
    ]
    for i, p in enumerate(procs):
        out.write(f"[launcher] process {i}: pid {p.pid}\n")
    relays = [
        threading.Thread(target=_relay, args=(p.stdout, f"[{i}] ", out), daemon=True)
        for i, p in enumerate(procs)
    ]
    for t in relays:
        t.start()

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    failed, deadline = None, None
    try:
        while any(p.poll() is None for p in procs):
            for i, p in enumerate(procs):
                if failed is None and p.poll() not in (None, 0):
                    failed = exit_code(p.returncode)
                    out.write(f"[launcher] process {i} exited with {failed}; stopping the "
                              "others\n")
                    forward(signal.SIGTERM, None)
                    deadline = time.time() + grace
            if deadline is not None and time.time() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for t in relays:
        t.join(timeout=5)
    if failed is None:
        failed = next((exit_code(p.returncode) for p in procs if p.returncode), 0)
    return failed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("num_processes", type=int)
    parser.add_argument("config", help="a config file, e.g. configs/demo.py")
    parser.add_argument("--devices", type=int, default=2, help="CPU devices per process")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds between SIGTERM and SIGKILL when one process failed")
    args, flags = parser.parse_known_args(argv)
    if args.num_processes < 1 or args.devices < 1:
        parser.error("num_processes and --devices must be >= 1")
    command = [sys.executable, "-m", "rsllm_jax.main", "--config", args.config, *flags]
    return run_cluster(args.num_processes, command, args.devices, args.grace)


if __name__ == "__main__":
    sys.exit(main())
