"""``python -m medseg``."""

from medseg.cli import main

main()
