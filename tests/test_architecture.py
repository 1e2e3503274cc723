"""The dependency direction: recap_tasks never imports Airflow; DAG files import no torch."""

import subprocess
import sys

from tests.helpers import REPO


def test_recap_tasks_never_imports_airflow():
    code = (
        "import importlib, pkgutil, sys, recap_tasks\n"
        "for m in pkgutil.walk_packages(recap_tasks.__path__, 'recap_tasks.'):\n"
        "    if m.name != 'recap_tasks.__main__': importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n == 'airflow' or n.startswith('airflow.'))\n"
        "print(len([n for n in sys.modules if n.startswith('recap_tasks')]))\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) > 15  # every module was imported


def test_no_airflow_import_statement_in_recap_tasks():
    offenders = [p for p in (REPO / "recap_tasks").rglob("*.py")
                 if any(line.lstrip().startswith(("import airflow", "from airflow"))
                        for line in p.read_text().splitlines())]
    assert offenders == []
