"""``make install-min`` / ``make demo``: the runtime only (``pip install -e .``), unless a current full install is
there; re-installed when pyproject.toml, the Makefile or the lock is newer than its stamp."""

import os

import pytest

from tests.test_install import _dry, make_dir  # noqa: F401  (the fixture)


@pytest.mark.parametrize("target", ["demo", "install-min"])
def test_runtime_install_is_torch_then_the_package_without_extras(make_dir, target):  # noqa: F811
    out = _dry(make_dir, target)
    assert "pip install -c requirements/lock.txt \"torch==" in out
    assert "pip install -c requirements/lock.txt -e .\n" in out and "[dev]" not in out
    assert out.index("torch==") < out.index("-e .")


def test_demo_installs_until_a_stamp_is_current(make_dir):  # noqa: F811
    runtime, full = make_dir / ".venv" / ".installed-runtime", make_dir / ".venv" / ".installed"
    runtime.write_text("")
    os.utime(runtime, (2_000_000_000, 2_000_000_000))
    assert "pip install" not in _dry(make_dir, "demo")
    for rel in ("pyproject.toml", "Makefile", "requirements/lock.txt"):
        os.utime(make_dir / rel, (3_000_000_000, 3_000_000_000))
        assert "pip install" in _dry(make_dir, "demo"), f"a newer {rel} must re-install"
        full.write_text("")  # ... unless the full install is newer still: it holds the runtime
        os.utime(full, (4_000_000_000, 4_000_000_000))
        assert "pip install" not in _dry(make_dir, "demo")
        full.unlink()
        os.utime(make_dir / rel, (1_000_000_000, 1_000_000_000))
