"""`python -m edgeexit` runs the command line (as `torchrun -m edgeexit` needs)."""
from edgeexit.cli import main

main()
