"""`python -m toolkit` (used by `accelerate launch -m toolkit train ...`)."""

from toolkit.cli import main

main()
