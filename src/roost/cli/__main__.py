"""``python -m roost.cli``: the ``roost`` script (handy for ``-X importtime``)."""

from roost.cli import main

main()
