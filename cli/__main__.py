"""``python -m cadrelu``: the same as the ``cadrelu`` console script."""

from cadrelu.entry import main

main()
