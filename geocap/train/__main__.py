"""``python -m geocap.train ...`` = ``geocap train ...``."""
import sys

from geocap.train import main

sys.exit(main())
