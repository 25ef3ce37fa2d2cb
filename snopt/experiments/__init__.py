"""The paper's three applications and the `python -m snopt.experiments` command line."""
