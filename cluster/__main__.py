"""``python -m cluster ...`` (also the ``ray job submit`` entrypoint)."""

from cluster.cli.main import main

if __name__ == "__main__":
    main()
