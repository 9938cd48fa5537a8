"""``python -m kvmio.cli``."""

from kvmio.cli.app import main

if __name__ == "__main__":
    main()
