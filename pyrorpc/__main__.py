"""``python -m pyrorpc``: the same as the ``pyrorpc`` command."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="pyrorpc")
