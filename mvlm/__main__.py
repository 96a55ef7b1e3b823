import sys

from mvlm.cli import main

if __name__ == "__main__":
    sys.exit(main())
