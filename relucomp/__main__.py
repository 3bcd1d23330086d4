"""``python -m relucomp`` = the ``relucomp`` command."""

from relucomp.cli import main

main()
