"""``python -m metarun`` is the ``metarun`` command (what ``torchrun -m metarun`` starts)."""

from metarun.cli import main

main()
