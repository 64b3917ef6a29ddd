"""``python -m moediffuseq`` is the ``moediffuseq`` command."""
import sys

from moediffuseq.cli import main

sys.exit(main())
