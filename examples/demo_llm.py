"""The causal-LM demo (`make demo-llm`, `loldu demo --llm`): it ships inside the package as loldu.demo_llm,
so that `loldu demo --llm` runs from any install; this file runs the same thing from a checkout."""
import sys

from loldu.demo_llm import main

if __name__ == "__main__":
    sys.exit(main())
