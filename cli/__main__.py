"""``python -m cli``: the same as the ``cadrelu`` console script."""

from cli.entry import main

main()
