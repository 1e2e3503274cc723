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


def test_the_stage_order_is_declared_once_and_followed():
    """recap_tasks.stages declares the order; the local pipeline, the progress records and the CLI
    follow it (the DAGs' chain is checked against it in tests/dags); the declaration imports only
    the standard library, so DAG files may read it."""
    from recap_tasks import pipeline, progress, stages

    assert tuple(pipeline.STEPS) == stages.RUN
    assert progress.STAGES == tuple(s.name for s in stages.STAGES if s.records)
    assert all(progress.STAGES.index(up) < progress.STAGES.index(stage) for stage, up in progress.UPSTREAM.items())
    names = [s.name for s in stages.STAGES]
    assert all(names.index(s.upstream) < names.index(s.name) for s in stages.STAGES if s.upstream)
    code = ("import sys, recap_tasks.stages\n"
            "print(sorted(m for m in sys.modules if m.startswith('recap_tasks')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "['recap_tasks', 'recap_tasks.stages']", out.stderr
