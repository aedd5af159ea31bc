import sys

from efficientml.cli.main import main

sys.exit(main())
