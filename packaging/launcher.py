"""PyInstaller entry point: the `abstractgateway` console script as a one-file binary."""

import sys

import abstractgateway

if __name__ == "__main__":
    sys.exit(abstractgateway.main())
