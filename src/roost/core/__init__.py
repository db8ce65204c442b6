"""The pure core: states, events, commands and the transition function.

Nothing here does I/O, touches asyncio or reads a clock: ``now`` is always an
argument. Everything that decides lives here and is tested with tables and
Hypothesis; everything that acts lives in ``roost.reactor``.
"""
