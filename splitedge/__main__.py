"""`python -m splitedge` / the `splitedge` console script."""

from splitedge.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
