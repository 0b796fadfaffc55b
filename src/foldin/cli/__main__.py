"""python -m foldin.cli"""

import sys

from foldin.cli import main

sys.exit(main())
