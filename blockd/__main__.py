import sys

from blockd.cli import main

sys.exit(main())
