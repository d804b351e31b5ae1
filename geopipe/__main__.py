"""``python -m geopipe`` runs the command line (the same as the ``geopipe`` script)."""

from geopipe.flows.cli import main

if __name__ == "__main__":
    main()
