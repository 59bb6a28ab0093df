"""``python -m nnunet_logmamba doctor``."""
import sys

from .cli import main

sys.exit(main())
