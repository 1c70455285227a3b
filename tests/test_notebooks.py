"""The Colab notebooks: stored without outputs, and executing cleanly (on reduced settings).

Each notebook is executed with nbclient in a kernel that runs this interpreter (a temporary
kernelspec pointing at sys.executable), after replacing the values of its `parameters` cell:
the quick start on the session's tiny demo corpus with a small model and 6 steps.
"""

import json
import os
import re
import sys

import pytest

from tests.conftest import REPO_ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

COLAB = os.path.join(REPO_ROOT, "colab")
NOTEBOOKS = ("quickstart.ipynb", "multi_sinkhorn.ipynb")
KERNEL_NAME = "msk-jax-tests"
CELL_TIMEOUT_S = 300


def read(name):
    return nbformat.read(os.path.join(COLAB, name), as_version=4)


def parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "expected exactly one cell tagged 'parameters'"
    assert cells[0].cell_type == "code"
    return cells[0]


def set_parameters(nb, **values):
    """Replaces `NAME = ...` lines of the parameters cell; every NAME must already be there."""
    cell = parameters_cell(nb)
    source = cell.source
    for name, value in values.items():
        pattern = re.compile(rf"^{name}\s*=.*$", re.M)
        assert pattern.search(source), f"parameter {name} is not in the parameters cell"
        source = pattern.sub(lambda _: f"{name} = {value!r}", source)
    cell.source = source
    return nb


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
    """A kernelspec that starts ipykernel with this interpreter (the venv's), found first."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "msk_jax tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    assert spec.argv[0] == sys.executable
    return KERNEL_NAME


def execute(nb, kernel_name, save_to):
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": COLAB}})
    # Small shapes compile far longer than they run: trade XLA optimisation for compile time.
    env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    try:
        client.execute(env=env)
    finally:
        nbformat.write(nb, str(save_to))  # the executed notebook, for a look when a test fails
    return nb


def outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def stream_text(nb):
    return "".join(o.get("text", "") for o in outputs(nb) if o.output_type == "stream")


def check_clean_run(nb, min_images):
    errors = [o for o in outputs(nb) if o.output_type == "error"]
    assert not errors, "\n".join(f"{e.ename}: {e.evalue}" for e in errors)
    images = [o for o in outputs(nb) if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= min_images, f"{len(images)} images, expected at least {min_images}"
    assert all(c.execution_count is not None for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
    nb = read(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: a code cell has outputs"
            assert cell.execution_count is None, f"{name}: a code cell has an execution count"
    parameters_cell(nb)


@pytest.mark.slow
def test_quickstart_runs_on_the_tiny_corpus(tiny_corpus, tmp_path, kernel_name):
    workdir = tmp_path / "run"
    nb = set_parameters(read("quickstart.ipynb"), CORPUS_DIR=tiny_corpus, CORPUS_SIZE="tiny", FEATURE_DIM=16,
                        NUM_STEPS=6, SMALL_MODEL=True, WORKDIR=str(workdir), HEATMAP_CLIPS=12)
    nb = execute(nb, kernel_name, tmp_path / "quickstart.executed.ipynb")
    # Inputs, loss curves, anchor heatmaps, anchor x digit heatmaps, retrieval examples (the inputs
    # take two figures).
    check_clean_run(nb, min_images=6)
    text = stream_text(nb)
    assert "training 6 steps" in text
    assert "MSRVTT" in text and "YouCook2" in text and "t2v" in text
    assert "restored step 6" in text
    assert "| MSRVTT | video/joint |" in text and "NMI digit present" in text
    assert "query '" in text and "correct clip at rank" in text
    assert (workdir / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_multi_sinkhorn_notebook_runs(tmp_path, kernel_name):
    nb = set_parameters(read("multi_sinkhorn.ipynb"), CHECK_ITERS=(1, 5, 20))
    nb = execute(nb, kernel_name, tmp_path / "multi_sinkhorn.executed.ipynb")
    check_clean_run(nb, min_images=4)
    text = stream_text(nb)
    match = re.search(r"strongly assigned anchors per sample: Multi-SK ([\d.]+), Sinkhorn-Knopp ([\d.]+)", text)
    assert match, text
    multi, single = map(float, match.groups())
    assert multi > 2.5 > 1.5 > single  # about R = 3 anchors per sample against about one
