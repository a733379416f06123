"""notebooks/demo.ipynb, run without jupyter: code cells are executed in order in one namespace, with
IPython's `!cmd` lines turned into calls of a recorder (`{name}` expanded as IPython does)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "demo.ipynb")
# Fashion-MNIST's classes in label order (the dataset's documentation), for the plots' labels.
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]

RUNNER = r'''
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from test_notebook import code_cells

def shell(cmd):
    raise SystemExit(f"the notebook ran a shell command with iar_jax installed: {cmd}")

ns = {"__name__": "__main__", "__shell__": shell}
for i, src in enumerate(code_cells()):
    exec(compile(src, f"cell {i}", "exec"), ns)
    print(f"cell {i} ok", flush=True)
plt = ns["plt"]
grid_ax, sample_axes = plt.figure(1).axes, plt.figure(2).axes
np.savez(sys.argv[3], images=ns["new"]["images"], labels=ns["new"]["labels"])
print("RESULT " + json.dumps({
    "metrics": {k: ns["metrics"][k] for k in ("fid", "class_accuracy", "num_samples", "grid")},
    "grid_title": grid_ax[0].get_title(), "grid_yticks": [t.get_text() for t in grid_ax[0].get_yticklabels()],
    "sample_axes": len(sample_axes), "row_titles": [sample_axes[4 * r].get_title(loc="left") for r in range(10)]}))
'''


def shell_lines_as_calls(src: str) -> str:
    """`!cmd` -> `__shell__(f'''cmd''')` at the same indentation: a call the test records."""
    return re.sub(r"^(\s*)!(.*)$", lambda m: f"{m[1]}__shell__(f'''{m[2]}''')", src, flags=re.M)


def code_cells():
    with open(NOTEBOOK) as f:
        nb = json.load(f)
    return [shell_lines_as_calls("".join(c["source"])) for c in nb["cells"] if c["cell_type"] == "code"]


def test_install_cell_clones_and_installs_only_without_the_package(tmp_path, monkeypatch):
    import importlib.util

    install = code_cells()[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("IAR_JAX_REPO_URL", raising=False)
    monkeypatch.delenv("IAR_JAX_EXTRA", raising=False)

    def run_cell():
        calls = []
        exec(compile(install, "install cell", "exec"), {"__shell__": calls.append})
        return calls

    path = list(sys.path)
    assert run_cell() == [] and sys.path == path  # installed (as here): nothing happens
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "iar_jax" else real(name, *a))
    with pytest.raises(SystemExit, match="set REPO_URL above to the git URL"):
        run_cell()
    monkeypatch.setenv("IAR_JAX_REPO_URL", "https://example.org/iar-jax.git")
    monkeypatch.setenv("IAR_JAX_EXTRA", "[tpu]")
    assert run_cell() == ["git clone -q https://example.org/iar-jax.git iar-jax", 'pip install -q -e "iar-jax[tpu]"']
    assert sys.path[0] == str(tmp_path / "iar-jax")
    os.mkdir(tmp_path / "iar-jax")  # already cloned: only the install
    assert run_cell() == ['pip install -q -e "iar-jax[tpu]"']


@pytest.mark.slow
def test_notebook_runs_headless_on_smoke_settings(tmp_path):
    from iar_jax.evaluation import small_cnn

    workdir = tmp_path / "nb"
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu",
           "MPLBACKEND": "Agg", "IAR_JAX_DEMO_PRESET": "smoke", "IAR_JAX_DEMO_WORKDIR": str(workdir)}
    env.pop("XLA_FLAGS", None)
    here = os.path.dirname(os.path.abspath(__file__))
    p = subprocess.run([sys.executable, "-c", RUNNER, NOTEBOOK, here, str(tmp_path / "new.npz")], env=env,
                       capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    r = json.loads(p.stdout.split("RESULT ", 1)[1])

    # What the cells show is what the demo wrote to disk.
    with open(workdir / "metrics.json") as f:
        on_disk = json.load(f)
    assert r["metrics"] == {k: on_disk[k] for k in r["metrics"]}
    assert r["metrics"]["grid"] == str(workdir / "grid.png")
    fid, acc = on_disk["fid"], on_disk["class_accuracy"]
    assert r["grid_title"] == f"iar: FID {fid:.1f}, class accuracy {acc:.0%}"
    assert f"FID (small CNN, vs 64 test images): {fid:.2f}" in p.stdout  # the summary cell's print
    assert r["grid_yticks"] == CLASS_NAMES and r["row_titles"] == CLASS_NAMES and r["sample_axes"] == 40
    # The reported class accuracy, recounted from the demo's samples with the small classifier.
    with np.load(workdir / "samples" / "samples.npz") as z:
        pred = small_cnn.predict(small_cnn.load_params(), z["arr_0"])["logits"].argmax(-1)
        assert len(z["labels"]) == r["metrics"]["num_samples"] == 20
        assert acc == pytest.approx(float(np.mean(pred == z["labels"])), abs=1e-9)
    # The resampling cell: 4 new samples of each class, as written to more_samples/.
    with np.load(tmp_path / "new.npz") as new, np.load(workdir / "more_samples" / "samples.npz") as z:
        assert new["images"].shape == (40, 28, 28, 3) and new["images"].dtype == np.uint8
        np.testing.assert_array_equal(new["labels"], np.repeat(np.arange(10), 4))
        np.testing.assert_array_equal(new["images"], z["arr_0"])
