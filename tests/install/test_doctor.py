"""`vtprune doctor`: passes on a working install, and reports (not hides) a failing check."""

import io

import pytest

from vtprune import doctor
from vtprune.cli import main as cli_main


def test_doctor_passes_on_one_family_and_prints_versions(capsys):
    assert doctor.main(["--families", "llava"]) == 0
    out = capsys.readouterr().out
    assert "transformers" in out and "torch" in out
    assert "PASS  llava" in out and "1/1 families pass" in out


def test_doctor_reports_a_failing_check(monkeypatch):
    # a tolerance no comparison can meet: every check that compares logits must fail, the token check not
    monkeypatch.setattr(doctor, "TOL", -1.0)
    out = io.StringIO()
    results = doctor.run(["llava"], out=out)
    errors = results["llava"]
    assert errors["identity"] and errors["hand-pruned"] and errors["batch"]
    assert errors["cache"] is None
    assert "FAIL  llava" in out.getvalue() and "identity: AssertionError" in out.getvalue()


def test_doctor_refuses_an_unknown_family(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["doctor", "--families", "llama"])
    assert exc.value.code == 2
    assert "unknown families ['llama']" in capsys.readouterr().err


def _broken_torchvision(tmp_path):
    """A torchvision that is installed (has metadata) but raises on import, as a build for another torch does."""
    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    meta = tmp_path / "torchvision-0.99.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.99.0\n")
    (meta / "RECORD").write_text("")
    return tmp_path


def test_import_and_doctor_survive_a_broken_torchvision(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(_broken_torchvision(tmp_path)), str(root)]))
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0  # the fake is installed and broken
    ok = subprocess.run(
        [sys.executable, "-c", "import vtprune; print(len(vtprune.available_policies()))"],
        env=env,
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    out = subprocess.run([sys.executable, "-m", "vtprune.cli", "doctor"], env=env, capture_output=True, text=True, cwd=root)
    assert out.returncode == 1
    assert "FAIL  torchvision: torchvision 0.99.0 does not import beside torch" in out.stdout
    assert "--no-deps" in out.stdout
