import sys

from fedchat.cli import main

sys.exit(main())
