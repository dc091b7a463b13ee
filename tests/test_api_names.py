"""The public API names keep working whatever featx imported before (a package and a function share `audit`)."""
import subprocess
import sys

import pytest


@pytest.mark.parametrize("first", ["import featx.audit.neighbors", "pass"])
def test_featx_audit_is_the_function_after_the_package_was_imported(first, tmp_path):
    code = ("import featx\n" + first + "\n"
            "from featx.errors import FeatxError\n"
            "try:\n"
            f"    featx.audit({str(tmp_path / 'missing.npz')!r}, report_dir=False)\n"
            "except FeatxError as exc:\n"
            "    print('featx error:', exc)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "featx error:" in r.stdout and "missing.npz" in r.stdout, r.stdout
