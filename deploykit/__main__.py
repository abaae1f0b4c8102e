import sys

from deploykit.cli.app import main

sys.exit(main())
