import sys

from twla.cli import main

sys.exit(main())
