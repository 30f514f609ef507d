"""Run from the repository root (a REPL, ``python -c``, a notebook), the root is on ``sys.path``: its
``kernels/`` folder (geocap.kernels) must not shadow Hugging Face's ``kernels`` distribution, which
transformers 5 imports."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(code, *flags):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=120)


def test_transformers_imports_from_the_repository_root():
    pytest.importorskip("transformers")
    code = ("import sys; assert sys.path[0] == ''; "
            "from transformers import VisionEncoderDecoderModel; import kernels, geocap.kernels; "
            "print(kernels.__file__); print(geocap.kernels.__file__); print(geocap.kernels.attention_entropy.__name__)")
    out = _run(code)
    assert out.returncode == 0, out.stderr[-2000:]
    hub, ours, name = out.stdout.split()
    assert Path(ours) == ROOT / "kernels" / "__init__.py" and name == "attention_entropy"
    try:
        import importlib.metadata
        importlib.metadata.version("kernels")            # Hugging Face's kernels distribution
    except importlib.metadata.PackageNotFoundError:
        return
    assert Path(hub).resolve() != (ROOT / "kernels" / "__init__.py").resolve(), hub   # the installed distribution
    assert "site-packages" in Path(hub).parts, hub                                     # (a venv may be in ROOT)


def test_top_level_kernels_without_the_distribution_is_not_found():
    # -S: no site-packages, so no Hugging Face kernels; the folder refuses to be a top-level `kernels`
    out = _run("import sys\ntry:\n    import kernels\nexcept ModuleNotFoundError as e:\n"
               "    print(e.name, 'kernels' in sys.modules, e)", "-S")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("kernels False ") and "import geocap.kernels" in out.stdout
