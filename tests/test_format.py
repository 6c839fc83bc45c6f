"""The code is formatted by the repository's formatter configuration (.style.yapf: PEP 8, 100
columns): `yapf -ir rsllm_jax tests benchmarks configs launch` fixes what this test finds."""

import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("rsllm_jax", "tests", "benchmarks", "configs", "launch")


def _python_files():
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True,
                             check=False).stdout.split()
    if not tracked:  # Not a git checkout: every .py file under the folders.
        tracked = [
            os.path.relpath(os.path.join(root, name), REPO) for folder in FOLDERS
            for root, _, names in os.walk(os.path.join(REPO, folder)) for name in names
            if name.endswith(".py")
        ]
    return sorted(path for path in tracked if path.split("/")[0] in FOLDERS)


def test_every_python_file_is_formatted():
    yapf_api = pytest.importorskip("yapf.yapflib.yapf_api")
    style = os.path.join(REPO, ".style.yapf")
    unformatted = []
    for path in _python_files():
        _, _, changed = yapf_api.FormatFile(os.path.join(REPO, path), style_config=style,
                                            print_diff=True)
        if changed:
            unformatted.append(path)
    assert not unformatted, f"not formatted (run yapf -i): {unformatted}"
