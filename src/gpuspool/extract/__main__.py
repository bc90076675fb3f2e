"""``python -m gpuspool.extract ...``: the extraction worker."""

from __future__ import annotations

from gpuspool.extract.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
