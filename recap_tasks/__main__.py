"""`python -m recap_tasks ...` is the `recap` command (what Kubernetes pods run)."""

import sys

from recap_tasks.cli import main

sys.exit(main())
