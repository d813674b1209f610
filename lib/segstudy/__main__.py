import sys

from segstudy.cli import main

sys.exit(main())
