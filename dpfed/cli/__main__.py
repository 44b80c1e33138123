"""``python -m dpfed.cli``: the same entry point as the ``dpfed`` console script."""

from dpfed.cli import main

if __name__ == "__main__":
    main()
