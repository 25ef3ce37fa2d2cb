"""A user's CI can use `snopt.testing` from a real (non-editable) install of snopt.

`pip install --no-deps --no-build-isolation` of a copy of the project (pyproject.toml, README.md,
snopt/) into a fresh venv, offline. The fresh venv sees this environment's packages (torch,
torchdiffeq, pytest, setuptools, pip) through a .pth file instead of reinstalling them; such a
path is not a site directory, so this environment's editable snopt (a .pth finder hook) is not
activated there, and the user's test asserts that the snopt it imports is the one installed in
the fresh venv. The user's test file lives outside the repository and uses only `snopt.testing`
and snopt's public API: it must pass on a correct hand-written Hessian (exit 0) and fail, naming
the block, on one with a planted 1e-5 relative error (exit 1). One more user test uses the pytest
plugin's fixtures and marker, which only exist if the installed entry point (``pytest11``) loads.
"""

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

USER_TEST = '''
import importlib.metadata
import math
import os
import sys
from pathlib import Path

import pytest
import torch

import snopt
from snopt.testing import ClosedFormReference, LinearField, MLPField, assert_memory_flat, assert_second_order_close

PLANT = float(os.environ.get("PLANT", "0"))


def test_installed_snopt_is_the_one_in_this_venv():
    assert Path(snopt.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), snopt.__file__
    assert (Path(snopt.__file__).parent / "py.typed").is_file()
    meta = importlib.metadata.distribution("snopt")
    assert Path(str(meta.locate_file(""))).resolve().is_relative_to(Path(sys.prefix).resolve())
    assert "testing" in meta.metadata.get_all("Provides-Extra")
    assert any(r.startswith("hypothesis") and "testing" in r for r in meta.requires)


def _problem():
    # dx/dt = a x, L = (x(T) - y)^2 / 2 with theta = (a,): the bias is frozen at 0.
    a, x0, T, y = 0.7, 1.3, 0.9, 0.4
    field = LinearField(torch.tensor([[a]], dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    field.b.requires_grad_(False)
    loss_fn = lambda x: 0.5 * ((x - y) ** 2).sum()
    x0_, t_span = torch.tensor([x0], dtype=torch.float64), torch.tensor([0.0, T], dtype=torch.float64)
    return field, x0_, t_span, loss_fn, (a, x0, T, y)


def my_hessian(a, x0, T, y):
    """The hand-written derivatives under test: x(T) = x0 e^(aT)."""
    e = math.exp(a * T)
    x = x0 * e
    return {
        "grad_params": torch.tensor([(x - y) * x * T], dtype=torch.float64),
        "hess_params": torch.tensor([[(2 * x - y) * x * T * T * (1 + PLANT)]], dtype=torch.float64),
        "hess_x0": torch.tensor([[e * e]], dtype=torch.float64),
        "hess_x0_params": torch.tensor([[(2 * x - y) * e * T]], dtype=torch.float64),
    }


def test_my_hessian_matches_closed_form():
    field, x0, t_span, loss_fn, args = _problem()
    reference = ClosedFormReference(field, x0, t_span, loss_fn).second_order()
    assert_second_order_close(my_hessian(*args), reference)


def test_snopt_matches_closed_form_and_memory_is_flat():
    field, x0, t_span, loss_fn, _ = _problem()
    so = snopt.second_order(field, x0, t_span, loss_fn, rtol=1e-10, atol=1e-12, wrt_t1=True)
    assert_second_order_close(so, ClosedFormReference(field, x0, t_span, loss_fn).second_order(), solver_rtol=1e-10)
    x = x0.clone().requires_grad_(True)
    assert_memory_flat(lambda n: loss_fn(snopt.odeint(field, x, t_span, method="rk4",
                                                       options={"step_size": float(t_span[1]) / n})[-1]),
                       steps=(10, 100))


@pytest.mark.snopt_float64
def test_plugin_from_the_installed_entry_point(snopt_check, snopt_seed):
    report = snopt_check.second_order(MLPField(2, 3, "tanh", True, torch.get_default_dtype()), torch.randn(2),
                                      torch.tensor([0.0, 0.5]), lambda x: (x ** 2).sum(), step_size=1 / 16)
    assert report.ok and torch.get_default_dtype() == torch.float64
'''


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A fresh venv with snopt installed from a copy of the project (no deps, no network), and its env."""
    if importlib.util.find_spec("setuptools") is None or importlib.util.find_spec("pip") is None:
        pytest.skip("needs setuptools and pip in the test environment (an offline build without isolation)")
    if int(importlib.metadata.version("setuptools").split(".")[0]) < 68:
        pytest.skip("pyproject.toml's build backend needs setuptools>=68 in the test environment")
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "snopt", src / "snopt", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(env_dir)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    ours = dict.fromkeys(str(Path(sysconfig.get_paths()[k]).resolve()) for k in ("purelib", "platlib"))
    (purelib / "_snopt_test_parent_env.pth").write_text("\n".join(ours) + "\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1")
    proc = _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                 str(src)], base, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return python, env


def _user_pytest(fresh: tuple[Path, dict[str, str]], tmp_path: Path, plant: str) -> subprocess.CompletedProcess[str]:
    python, env = fresh
    user = tmp_path / "user_ci"
    user.mkdir()
    (user / "test_user_reference.py").write_text(textwrap.dedent(USER_TEST), encoding="utf-8")
    return _run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user_reference.py"], user,
                {**env, "PLANT": plant, "OMP_NUM_THREADS": "1"})


def test_user_ci_passes_on_correct_hessian(fresh_python: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    proc = _user_pytest(fresh_python, tmp_path, "0")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "4 passed" in proc.stdout


def test_user_ci_catches_planted_error(fresh_python: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    proc = _user_pytest(fresh_python, tmp_path, "1e-5")
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "1 failed, 3 passed" in out, out[-4000:]
    assert "second_order: 1 of 4 blocks differ from the reference" in out, out[-4000:]
    assert "hess_params (1, 1): relative error 1.000e-05" in out, out[-4000:]
