"""The demo (`make demo`, `loldu demo`): it ships inside the package as loldu.demo, so that `loldu demo`
runs from any install; this file runs the same thing from a checkout."""
import sys

from loldu.demo import main

if __name__ == "__main__":
    sys.exit(main())
