"""`python -m srsrelay`: the same as the `srsrelay` command."""

from srsrelay.cli import run

if __name__ == "__main__":
    run()
