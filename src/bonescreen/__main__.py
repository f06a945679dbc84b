import sys

from bonescreen.cli import main

sys.exit(main())
