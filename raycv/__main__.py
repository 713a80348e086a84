import sys

from raycv.cli import main

sys.exit(main())
