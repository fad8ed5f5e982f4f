"""``python -m vtok_fast ...`` runs the ``vtok-fast`` command line (``vtok_fast.cli.main``)."""
import sys

from vtok_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
