import sys

from vigie.cli import main

sys.exit(main())
